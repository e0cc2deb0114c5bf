"""The one canonical JSON encoder (sealroom.canonical): known answers, byte-for-byte agreement with
each of the three encoders Sealroom used before it (for the documents they wrote), the refusal of
non-finite numbers where the old encoder refused them, and a guard that no second encoder returns.

The three old encoders are written out here as the reference, flags and all:

- policies and MPC stage specs: ``ensure_ascii=False``, UTF-8;
- attestation evidence, simulated reports, the measured enclave config: ``ensure_ascii=True,
  allow_nan=False``, ASCII;
- MPC certificate offers: plain ``sort_keys, separators`` (ASCII escapes, NaN written).
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sealroom.attestation import SimulatedAttester, dev_init, enclave_measurement
from sealroom.attestation.evidence import Evidence
from sealroom.canonical import canonical_json
from sealroom.errors import AttestationError
from sealroom.policy import DatasetPolicy

REPO = Path(__file__).resolve().parents[3]
# Where product code lives (tests hold the reference encoders above, on purpose).
SOURCE_ROOTS = ("sealroom", "coordinator", "connectors", "enclave_worker", "mpc", "scripts", "benchmarks")
THE_ENCODER = REPO / "sealroom" / "canonical.py"


def old_policy_encoder(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def old_evidence_encoder(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def old_offer_encoder(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------------

KNOWN_ANSWERS: list[tuple[Any, bytes]] = [
    ({}, b"{}"),
    ([], b"[]"),
    ({"b": 1, "a": [True, None, 1.5, "x"]}, b'{"a":[true,null,1.5,"x"],"b":1}'),
    ({"z": {"y": 1, "x": 2}, "a": []}, b'{"a":[],"z":{"x":2,"y":1}}'),
    ({"n": -0.0, "big": 10**20, "f": 1e-7}, b'{"big":100000000000000000000,"f":1e-07,"n":-0.0}'),
    ({"quote": 'a"b\\c\n'}, b'{"quote":"a\\"b\\\\c\\n"}'),
    ({"control": "\x01"}, b'{"control":"\\u0001"}'),
    ({"name": "Z\u00fcrich", "\u00e9": "\u65e5"}, '{"name":"Zürich","é":"日"}'.encode()),  # UTF-8, not \\u escapes
    ([float("nan"), float("inf"), float("-inf")], b"[NaN,Infinity,-Infinity]"),  # a released float cell
]


@pytest.mark.parametrize(("doc", "expected"), KNOWN_ANSWERS)
def test_known_answers(doc: Any, expected: bytes) -> None:
    assert canonical_json(doc) == expected


def test_a_policy_digest_is_the_one_todays_receipts_were_signed_over() -> None:
    """Computed with the policy encoder of the tree before step 1 (its own canonical function)."""
    policy = DatasetPolicy.from_dict(
        {
            "privacy_unit": "customer_id",
            "min_group_size": 10,
            "analysts": ["alice"],
            "columns": {
                "customer_id": "join_key",
                "amount": {"role": "measure", "min": 0, "max": 1e6},
                "region": "dimension",
            },
        }
    )
    assert policy.canonical() == (
        b'{"analysts":["alice"],"approval":"auto","columns":{"amount":{"aggregates":["count","sum","avg","var",'
        b'"stddev"],"max":1000000.0,"min":0.0,"role":"measure"},"customer_id":{"role":"join_key"},"region":'
        b'{"role":"dimension"}},"default_role":"forbidden","dominance":null,"min_group_size":10,'
        b'"privacy_unit":"customer_id","version":1}'
    )
    assert policy.digest() == "eddf90a3952f1dd4ad18d2384773a13f6cf60872b3b64316e6524c78b7383a9b"


def test_an_evidence_envelope_is_the_bytes_and_hash_the_old_encoder_wrote() -> None:
    """Computed with the evidence encoder of the tree before step 1: the evidence hash that sealed
    streams bind (HPKE info) is unchanged."""
    evidence = Evidence("tdx", bytes([1, 2]), b"", b"n" * 16)
    assert evidence.to_bytes() == (
        b'{"aux":"","evidence":"AQI=","format":"tdx","nonce":"bm5ubm5ubm5ubm5ubm5ubg==","v":1}'
    )
    assert evidence.digest().hex() == "954ef48d7c994d87bc1a52f6b4f8dc5c3248b8ddfd2a9308b9566a4dac2422cc"


# ---------------------------------------------------------------------------------------------------
# The same bytes as each old encoder, for the documents they wrote
# ---------------------------------------------------------------------------------------------------

# ASCII without DEL (0x7f), which the ASCII-escaping encoders wrote as \u007f (see below).
ascii_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=126), max_size=12)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | ascii_text
ascii_documents = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ascii_text, children, max_size=4),
    max_leaves=20,
)


@given(ascii_documents)
def test_ascii_documents_encode_as_each_old_encoder_did(doc: Any) -> None:
    out = canonical_json(doc)
    assert out == old_policy_encoder(doc)
    assert out == old_evidence_encoder(doc)
    assert out == old_offer_encoder(doc)
    assert canonical_json(doc, allow_nan=False) == out


@given(ascii_documents)
def test_canonical_bytes_read_back_to_the_same_document_and_reencode_identically(doc: Any) -> None:
    out = canonical_json(doc)
    assert canonical_json(json.loads(out)) == out


def test_non_ascii_text_is_where_the_old_ascii_encoders_differed() -> None:
    """The one difference from the ASCII-escaping encoders: text outside printable ASCII and control
    characters (non-ASCII, and DEL) is written as UTF-8. None of the documents they encoded (base64,
    hex, known format names and identifiers) ever held such text."""
    doc = {"city": "Z\u00fcrich"}
    assert canonical_json(doc) == old_policy_encoder(doc)
    assert canonical_json(doc) != old_evidence_encoder(doc) == b'{"city":"Z\\u00fcrich"}'
    # DEL is ASCII, but ensure_ascii=True escaped it too.
    assert canonical_json("\x7f") == old_policy_encoder("\x7f") == b'"\x7f"'
    assert old_evidence_encoder("\x7f") == old_offer_encoder("\x7f") == b'"\\u007f"'


# ---------------------------------------------------------------------------------------------------
# Non-finite numbers: refused where the old encoder refused them
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_allow_nan_false_refuses_non_finite_numbers_anywhere(value: float) -> None:
    for doc in (value, [1, value], {"a": {"b": [value]}}):
        with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
            canonical_json(doc, allow_nan=False)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_the_measured_enclave_config_refuses_non_finite_numbers_as_before(value: float) -> None:
    with pytest.raises(ValueError) as refused:
        enclave_measurement({"limit": value})
    with pytest.raises(ValueError) as old:
        old_evidence_encoder({"limit": value})
    assert str(refused.value) == str(old.value)


def test_simulated_evidence_holds_no_number_but_integers(tmp_path: Path) -> None:
    """A simulated report's numbers are the version and TCB components, which must be ints (a float,
    NaN included, is refused before anything is encoded)."""
    root = dev_init(tmp_path / "dev")
    with pytest.raises(TypeError, match="must be int"):
        SimulatedAttester(root, measurement="ab" * 48, tcb={"svn": math.nan})  # type: ignore[dict-item]
    evidence = SimulatedAttester(root, measurement="ab" * 48, tcb={"svn": 3}).attest(
        report_data=bytes(64), nonce=b"n" * 16
    )
    assert b"NaN" not in evidence.to_bytes() and b"NaN" not in evidence.evidence


@pytest.mark.parametrize(
    "envelope",
    [
        b'{"aux":"","evidence":"","format":"tdx","nonce":"","v":NaN}',
        b'{"aux":"","evidence":"","format":"tdx","nonce":"","v":Infinity}',
        b'{"aux":"","evidence":"","format":"tdx","nonce":"","v":1.0}',
        b'{"aux":NaN,"evidence":"","format":"tdx","nonce":"","v":1}',
        b'{"aux":"","evidence":"","format":NaN,"nonce":"","v":1}',
        b'{"aux":"","aux":"","evidence":"","format":"tdx","nonce":"","v":1}',
        b'{"aux":"","evidence":"","format":"tdx","nonce":"","v":1,"x":0}',
        b'{"aux":"","evidence":"!!","format":"tdx","nonce":"","v":1}',
        b"[]",
        b"\xff",
    ],
)
def test_evidence_parsing_still_refuses_what_it_refused(envelope: bytes) -> None:
    with pytest.raises(AttestationError) as refused:
        Evidence.from_bytes(envelope)
    assert refused.value.details["check"] == "envelope"


# ---------------------------------------------------------------------------------------------------
# No second encoder
# ---------------------------------------------------------------------------------------------------


def canonical_encoder_calls(source: str) -> list[int]:
    """Lines of ``json.dumps``/``json.dump`` calls (however ``json`` or ``dumps`` was imported) that
    sort keys and use the compact separators: a canonical encoder of their own."""
    tree = ast.parse(source)
    json_modules = {"json"}
    dump_functions: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            json_modules |= {a.asname or a.name for a in node.names if a.name == "json"}
        elif isinstance(node, ast.ImportFrom) and node.module == "json":
            dump_functions |= {a.asname or a.name for a in node.names if a.name in ("dumps", "dump")}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_dump = (
            isinstance(func, ast.Attribute)
            and func.attr in ("dumps", "dump")
            and isinstance(func.value, ast.Name)
            and func.value.id in json_modules
        ) or (isinstance(func, ast.Name) and func.id in dump_functions)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        sorts = isinstance(keywords.get("sort_keys"), ast.Constant) and keywords["sort_keys"].value is True
        separators = keywords.get("separators")
        compact = isinstance(separators, ast.Tuple) and [
            e.value for e in separators.elts if isinstance(e, ast.Constant)
        ] == [",", ":"]
        if is_dump and sorts and compact:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ('import json\njson.dumps(d, sort_keys=True, separators=(",", ":"))', [2]),
        ("import json as j\nj.dumps(d, separators=(',', ':'), sort_keys=True, ensure_ascii=False)", [2]),
        ('from json import dumps\ndumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)', [2]),
        ('from json import dump as d\nd(x, f, sort_keys=True, separators=(",", ":"))', [2]),
        ("import json\njson.dumps(d, indent=2, sort_keys=True)", []),  # display, not canonical bytes
        ('import json\njson.dumps(d, separators=(",", ":"))', []),
    ],
)
def test_the_guard_recognises_a_canonical_encoder(source: str, found: list[int]) -> None:
    assert canonical_encoder_calls(source) == found


def test_no_module_but_sealroom_canonical_encodes_canonical_json() -> None:
    files = [p for root in SOURCE_ROOTS for p in sorted((REPO / root).rglob("*.py")) if "v1" not in p.parts]
    assert THE_ENCODER in files and len(files) > 50
    assert canonical_encoder_calls(THE_ENCODER.read_text()) != []  # the guard sees the real one
    others = [
        f"{path.relative_to(REPO)}:{line}"
        for path in files
        if path != THE_ENCODER
        for line in canonical_encoder_calls(path.read_text(encoding="utf-8"))
    ]
    assert others == [], "encode with sealroom.canonical.canonical_json instead"
