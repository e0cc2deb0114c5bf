"""Intel DCAP collateral: genuine TCB info, QE identity and CRLs (go-tdx-guest for TDX, dcap-qvl for SGX;
provenance in tests/data/tdx/README.md and tests/data/sgx/README.md), and collateral forged under a
test root to cover revocation, FMSPC, QE identity, TDX module and TCB level selection."""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealroom.attestation import dcap
from sealroom.attestation.collateral import Collateral, SignedStructure, evaluate, load_collateral
from sealroom.attestation.platform import PlatformClaims
from sealroom.attestation.sgx import verify_sgx
from sealroom.attestation.tdx import parse_tdx_quote, verify_tdx
from sealroom.errors import AttestationError
from tests.unit.attestation.test_tdx import BODY_END, Forged, _cert, _raw_sig, forge

DATA = Path(__file__).resolve().parents[2] / "data"
TDX_DIR = DATA / "tdx"
TDX_QUOTE = (TDX_DIR / "gotdxguest-quote-v4-spr-e4.dat").read_bytes()[:4935]
SGX_QUOTE = (DATA / "sgx" / "dcapqvl-sgx-quote-v3.bin").read_bytes()
SGX_JSON = DATA / "sgx" / "dcapqvl-sgx-quote-v3-collateral.json"
# Inside every item's validity: TDX collateral 2023-06-18 .. 2023-07-08; SGX 2025-06-19 .. 2025-07-19.
TDX_AT = datetime(2023, 7, 1, tzinfo=UTC)
SGX_AT = datetime(2025, 7, 1, tzinfo=UTC)


def _refused(fn: Callable[[], object], check: str) -> AttestationError:
    with pytest.raises(AttestationError) as ei:
        fn()
    assert ei.value.details["check"] == check, ei.value
    return ei.value


# --------------------------------------------------------------------------- genuine collateral


def test_genuine_sgx_collateral_gives_its_tcb_status() -> None:
    claims = verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=load_collateral(SGX_JSON))
    assert isinstance(claims, PlatformClaims)
    d = claims.details
    # PCK CPU SVN (11,11,2,2,255,1,0,...) with PCESVN 13 misses the first level (component 7 needs 12)
    # and matches the second.
    assert d["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert d["platform_tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert d["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert d["qe_tcb_status"] == "UpToDate"  # QE ISVSVN 10 >= 8
    assert d["tcb_date"] == "2024-03-13T00:00:00Z" and d["tcb_evaluation_data_number"] == 17
    assert d["collateral_expires"] == "2025-07-19T10:01:18+00:00"  # the QE identity's nextUpdate
    assert claims.to_json_dict()["details"]["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    # Without collateral the same quote verifies with no TCB status at all.
    assert "tcb_status" not in verify_sgx(SGX_QUOTE, now=SGX_AT).details


def test_genuine_tdx_collateral_verifies_up_to_tcb_level_which_it_lacks() -> None:
    # go-tdx-guest's collateral verifies (signatures, chains, CRLs, FMSPC, QE identity, TDX module: every
    # step before the last), but its two TCB levels need SGX components (5,5,2,2,3,1,0,3) while this
    # pre-production SPR E4 PCK certifies (3,3,2,2,2,1,0,2) and TEE TCB SVN 03000400...: no level covers
    # it, which Intel's QVL reports as "TCB not supported". Refused, naming the platform's SVNs.
    collateral = load_collateral(TDX_DIR)
    err = _refused(lambda: verify_tdx(TDX_QUOTE, now=TDX_AT, collateral=collateral), "tcb_status")
    assert err.details["cpu_svn_components"] == [3, 3, 2, 2, 2, 1, 0, 2] + [0] * 8
    assert err.details["pce_svn"] == 11
    assert "no TCB level" in err.message


def test_directory_loader_reads_pcs_files_by_content(tmp_path: Path) -> None:
    for name, new in [
        ("gotdxguest-tcbinfo-response.json", "a.json"),
        ("gotdxguest-qeidentity-response.json", "b.json"),
        ("gotdxguest-pckcrl.der", "c"),
        ("gotdxguest-rootcrl.der", "d"),
        ("tcbinfo_issuer_chain.pem", "e.pem"),
    ]:
        (tmp_path / new).write_bytes((TDX_DIR / name).read_bytes())
    (tmp_path / "notes.txt").write_text("ignored")
    c = load_collateral(tmp_path)
    assert c.tcb_info.fields["fmspc"] == "50806f000000" and c.qe_identity.fields["id"] == "TD_QE"
    assert c.pck_crl.issuer.rfc4514_string().startswith("C=US") and "Root CA" in c.root_crl.issuer.rfc4514_string()
    (tmp_path / "c").unlink()
    err = _refused(lambda: load_collateral(tmp_path), "collateral")
    assert "pck_crl" in err.message
    (tmp_path / "c").write_bytes((TDX_DIR / "gotdxguest-pckcrl.der").read_bytes())
    (tmp_path / "c2").write_bytes((TDX_DIR / "gotdxguest-pckcrl.der").read_bytes())
    _refused(lambda: load_collateral(tmp_path), "collateral")
    _refused(lambda: load_collateral(tmp_path / "missing"), "collateral")


@pytest.mark.parametrize(
    ("at", "item", "word"),
    [
        (datetime(2025, 7, 19, 10, 10, tzinfo=UTC), "QE identity", "stale"),
        (datetime(2025, 7, 19, 10, 40, tzinfo=UTC), "PCK CRL", "stale"),
        (datetime(2025, 8, 1, tzinfo=UTC), "PCK CRL", "stale"),
        (datetime(2025, 6, 19, 10, 30, tzinfo=UTC), "TCB info", "not yet valid"),
        (datetime(2025, 6, 1, tzinfo=UTC), "PCK CRL", "not yet valid"),
    ],
)
def test_stale_or_early_sgx_collateral_refused(at: datetime, item: str, word: str) -> None:
    collateral = load_collateral(SGX_JSON)
    err = _refused(lambda: verify_sgx(SGX_QUOTE, now=at, collateral=collateral), "collateral")
    assert err.details["item"] == item and word in err.message


def test_stale_tdx_collateral_refused() -> None:
    collateral = load_collateral(TDX_DIR)
    err = _refused(
        lambda: verify_tdx(TDX_QUOTE, now=datetime(2023, 7, 9, tzinfo=UTC), collateral=collateral), "collateral"
    )
    assert "stale" in err.message


def _sgx_doc() -> dict[str, str]:
    return dict(json.loads(SGX_JSON.read_bytes()))


def _sgx_with(**changes: str) -> Collateral:
    doc = _sgx_doc() | changes
    return Collateral.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize(
    ("member", "old", "new"),
    [
        ("tcb_info", '"tcbEvaluationDataNumber":17', '"tcbEvaluationDataNumber":18'),
        ("tcb_info", '"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"'),
        ("tcb_info", '"fmspc":"00A067110000"', '"fmspc":"00a067110000"'),
        ("tcb_info", '"pceId":"0000",', '"pceId":"0000", '),  # whitespace only: still not the signed bytes
        ("qe_identity", '"isvprodid":1', '"isvprodid":2'),
        ("qe_identity", '"isvsvn":8', '"isvsvn":9'),
    ],
)
def test_changed_signed_json_refused(member: str, old: str, new: str) -> None:
    doc = _sgx_doc()
    assert old in doc[member]
    collateral = _sgx_with(**{member: doc[member].replace(old, new, 1)})
    err = _refused(lambda: verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=collateral), "collateral")
    assert "signature" in err.message


@pytest.mark.parametrize("offset", [20, 200, 1000, 2300])
def test_changed_byte_of_pcs_tcb_info_response_refused(tmp_path: Path, offset: int) -> None:
    for f in TDX_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "gotdxguest-tcbinfo-response.json"
    raw = bytearray(path.read_bytes())
    assert raw[offset : offset + 1].isalnum(), raw[offset : offset + 1]
    raw[offset] = ord("1") if raw[offset] != ord("1") else ord("2")
    path.write_bytes(bytes(raw))
    collateral = load_collateral(tmp_path)
    err = _refused(lambda: verify_tdx(TDX_QUOTE, now=TDX_AT, collateral=collateral), "collateral")
    assert err.details["item"] == "TCB info"


def test_whitespace_outside_the_signed_value_is_accepted(tmp_path: Path) -> None:
    for f in TDX_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = tmp_path / "gotdxguest-qeidentity-response.json"
    text = path.read_text()
    path.write_text(" " + text.replace('{"enclaveIdentity":', '{ "enclaveIdentity" :\n', 1) + "\n")
    collateral = load_collateral(tmp_path)
    signed = text[text.index('{"id"') : text.index(',"signature"')].encode()
    assert collateral.qe_identity.body == signed
    # The signature still verifies; evaluation proceeds to the (missing) TCB level.
    _refused(lambda: verify_tdx(TDX_QUOTE, now=TDX_AT, collateral=collateral), "tcb_status")


def test_wrong_issuer_chain_refused() -> None:
    doc = _sgx_doc()
    # The PCK CRL issuer chain (PCK Processor CA, root) chains to the pinned root but is not TCB Signing.
    err = _refused(
        lambda: verify_sgx(
            SGX_QUOTE, now=SGX_AT, collateral=_sgx_with(tcb_info_issuer_chain=doc["pck_crl_issuer_chain"])
        ),
        "collateral",
    )
    assert "TCB Signing" in err.message or "signature" in err.message
    # The TDX (2018) TCB Signing chain: a genuine Intel chain, but not the key that signed this TCB info.
    old_chain = (TDX_DIR / "tcbinfo_issuer_chain.pem").read_text()
    err = _refused(
        lambda: verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=_sgx_with(qe_identity_issuer_chain=old_chain)),
        "collateral",
    )
    assert err.details["item"] == "QE identity"
    # The chain in the wrong order (root first).
    certs = doc["tcb_info_issuer_chain"].split("-----END CERTIFICATE-----")
    swapped = certs[1].strip() + "\n-----END CERTIFICATE-----\n" + certs[0].strip() + "\n-----END CERTIFICATE-----\n"
    _refused(
        lambda: verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=_sgx_with(tcb_info_issuer_chain=swapped)), "collateral"
    )
    # A TCB Signing chain under a test root with Intel's names: refused by the root pin.
    key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Intel SGX Root CA", key, "Intel SGX Root CA", key, ca=True)
    signer = _cert("Intel SGX TCB Signing", key, "Intel SGX Root CA", key, ca=False)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (signer, root)).decode()
    err = _refused(
        lambda: verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=_sgx_with(tcb_info_issuer_chain=pem)), "collateral"
    )
    assert "pinned" in err.message


def test_tdx_collateral_for_an_sgx_quote_refused() -> None:
    # The SGX quote re-signed under a test root (its PCK leaf is then valid in 2023) and the genuine TDX
    # collateral, trusted through the real root: its signatures verify, its ids do not fit an SGX quote.
    f = forge(SGX_QUOTE)
    q = dcap.parse_quote(f.quote, label="SGX", version=3, tee_type=0, body_size=384)
    roots = [f.root, dcap.bundled_intel_root()]
    err = _refused(lambda: evaluate(q, load_collateral(TDX_DIR), roots=roots, now=TDX_AT), "collateral")
    assert "'TDX'" in err.message and "needs 'SGX'" in err.message


def test_pck_crl_of_another_ca_refused() -> None:
    # The TDX PCK CRL is the PCK Platform CA's; the SGX quote's PCK leaf is issued by the Processor CA.
    sgx, tdx = load_collateral(SGX_JSON), load_collateral(TDX_DIR)
    mixed = Collateral(tcb_info=sgx.tcb_info, qe_identity=sgx.qe_identity, pck_crl=tdx.pck_crl, root_crl=sgx.root_crl)
    err = _refused(lambda: verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=mixed), "collateral")
    assert err.details["item"] == "PCK CRL"


@pytest.mark.parametrize(
    "doc_change",
    [
        {"tcb_info_signature": "00" * 64},
        {"tcb_info_signature": "abcd"},
        {"tcb_info": "[]"},
        {"pck_crl": "3000"},
        {"qe_identity_issuer_chain": "not pem"},
    ],
)
def test_malformed_collateral_refused(doc_change: dict[str, str]) -> None:
    def run() -> None:
        verify_sgx(SGX_QUOTE, now=SGX_AT, collateral=_sgx_with(**doc_change))

    _refused(run, "collateral")


def test_malformed_pcs_response_refused() -> None:
    chain = (TDX_DIR / "tcbinfo_issuer_chain.pem").read_bytes()
    for body in (
        b'{"tcbInfo": {}, "signature": "00", "extra": 1}',
        b'{"tcbInfo": {}, "tcbInfo": {}, "signature": "00"}',
        b'{"tcbInfo": {}}',
        b'{"tcbInfo": {}, "signature": 5}',
        b'{"tcbInfo": {} "signature": "00"}',
        b'{"tcbInfo": {}, "signature": "00"} trailing',
        b"\xff",
    ):
        with pytest.raises(AttestationError) as ei:
            SignedStructure.from_response("tcbInfo", body, chain)
        assert ei.value.details["check"] == "collateral", body


# --------------------------------------------------------------------------- forged under a test root

FAR = datetime(2040, 1, 1, tzinfo=UTC)


@dataclass
class Lab:
    """A quote forged under a test root, and collateral for it signed by that root's keys."""

    forged: Forged
    tcb_info: dict[str, Any]
    qe_identity: dict[str, Any]
    pck_revoked: list[int]
    root_revoked: list[int]
    signing_key: ec.EllipticCurvePrivateKey

    def files(self, *, tcb_info_signer: ec.EllipticCurvePrivateKey | None = None) -> dict[str, bytes]:
        """The collateral as the PCS publishes it: ``Collateral.from_pcs`` keyword arguments."""
        f = self.forged
        signer = _cert("Intel SGX TCB Signing", self.signing_key, "Intel SGX Root CA", f.root_key, ca=False)
        chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (signer, f.root))

        def response(name: str, fields: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
            body = json.dumps(fields, separators=(",", ":")).encode()
            return b'{"' + name.encode() + b'":' + body + b',"signature":"' + _raw_sig(key, body).hex().encode() + b'"}'

        return {
            "tcb_info": response("tcbInfo", self.tcb_info, tcb_info_signer or self.signing_key),
            "tcb_info_issuer_chain": chain,
            "qe_identity": response("enclaveIdentity", self.qe_identity, self.signing_key),
            "qe_identity_issuer_chain": chain,
            "pck_crl": _crl(f.ca, f.ca_key, self.pck_revoked),
            "root_crl": _crl(f.root, f.root_key, self.root_revoked),
        }

    def collateral(self, **kw: Any) -> Collateral:
        return Collateral.from_pcs(**self.files(**kw))

    def verify(self, **kw: Any) -> PlatformClaims:
        f = self.forged
        verify = verify_tdx if struct.unpack_from("<I", f.quote, 4)[0] == 0x81 else verify_sgx
        return verify(f.quote, roots=[f.root], now=kw.pop("now", TDX_AT), collateral=self.collateral(**kw))

    def status(self) -> tuple[str, list[str]]:
        d = self.verify().details
        return d["tcb_status"], d["advisory_ids"]


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, serials: list[int]) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(datetime(2020, 1, 1, tzinfo=UTC))
        .next_update(FAR)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(datetime(2021, 1, 1, tzinfo=UTC))
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _genuine_fields(name: str) -> dict[str, Any]:
    files = {"tcbInfo": "gotdxguest-tcbinfo-response.json", "enclaveIdentity": "gotdxguest-qeidentity-response.json"}
    fields = json.loads((TDX_DIR / files[name]).read_bytes())[name]
    fields["issueDate"], fields["nextUpdate"] = "2020-01-01T00:00:00Z", "2040-01-01T00:00:00Z"
    return dict(fields)


def _level(sgx: list[int], pcesvn: int, tdx: list[int] | None, status: str, *advisories: str) -> dict[str, Any]:
    tcb: dict[str, Any] = {"sgxtcbcomponents": [{"svn": s} for s in sgx + [0] * (16 - len(sgx))], "pcesvn": pcesvn}
    if tdx is not None:
        tcb["tdxtcbcomponents"] = [{"svn": s} for s in tdx + [0] * (16 - len(tdx))]
    level: dict[str, Any] = {"tcb": tcb, "tcbDate": "2023-01-01T00:00:00Z", "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


# The genuine TDX PCK certifies CPU SVN components (3,3,2,2,2,1,0,2), PCESVN 11; the TD's TEE TCB SVN is
# (3,0,4); the QE is ISVSVN 4, ISVPRODID 2.
PCK = [3, 3, 2, 2, 2, 1, 0, 2]
TEE = [3, 0, 4]


def _tdx_lab(levels: list[dict[str, Any]] | None = None, **forge_kw: Any) -> Lab:
    tcb_info = _genuine_fields("tcbInfo")
    tcb_info["tcbLevels"] = levels or [_level(PCK, 11, TEE, "UpToDate")]
    return Lab(
        forged=forge(TDX_QUOTE, **forge_kw),
        tcb_info=tcb_info,
        qe_identity=_genuine_fields("enclaveIdentity"),
        pck_revoked=[],
        root_revoked=[],
        signing_key=ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture
def lab() -> Lab:
    return _tdx_lab()


def test_forged_collateral_up_to_date(lab: Lab) -> None:
    assert lab.status() == ("UpToDate", [])
    d = lab.verify().details
    assert d["platform_tcb_status"] == d["qe_tcb_status"] == "UpToDate" and "tdx_module_tcb_status" not in d
    # The genuine Intel root does not trust this collateral: refused by the quote's own root pin.
    _refused(lambda: verify_tdx(lab.forged.quote, now=TDX_AT, collateral=lab.collateral()), "root")


def test_collateral_signed_by_another_key_refused(lab: Lab) -> None:
    err = _refused(lambda: lab.verify(tcb_info_signer=ec.generate_private_key(ec.SECP256R1())), "collateral")
    assert err.details["item"] == "TCB info"


def test_pck_leaf_on_the_pck_crl_refused(lab: Lab) -> None:
    lab.pck_revoked = [12345, lab.forged.leaf.serial_number]
    err = _refused(lab.verify, "revocation")
    assert err.details["certificate"] == "PCK leaf"
    assert err.details["serial"] == f"{lab.forged.leaf.serial_number:x}"


def test_pck_ca_on_the_root_crl_refused(lab: Lab) -> None:
    lab.root_revoked = [lab.forged.ca.serial_number]
    assert _refused(lab.verify, "revocation").details["certificate"] == "PCK CA"


def test_other_serials_on_the_crls_are_fine(lab: Lab) -> None:
    lab.pck_revoked, lab.root_revoked = [1, 2, 3], [4]
    assert lab.status()[0] == "UpToDate"


def test_crl_signed_by_another_key_refused(lab: Lab) -> None:
    good = lab.collateral()
    other = ec.generate_private_key(ec.SECP256R1())
    bad = Collateral(
        tcb_info=good.tcb_info,
        qe_identity=good.qe_identity,
        pck_crl=x509.load_der_x509_crl(_crl(lab.forged.ca, other, [])),
        root_crl=good.root_crl,
    )
    f = lab.forged
    err = _refused(lambda: verify_tdx(f.quote, roots=[f.root], now=TDX_AT, collateral=bad), "collateral")
    assert err.details["item"] == "PCK CRL"


def test_fmspc_mismatch_refused(lab: Lab) -> None:
    lab.tcb_info["fmspc"] = "50806f000001"
    err = _refused(lab.verify, "fmspc")
    assert err.details["fmspc"] == "50806f000000" and err.details["tcb_info_fmspc"] == "50806f000001"
    lab.tcb_info["fmspc"], lab.tcb_info["pceId"] = "50806F000000", "0100"
    _refused(lab.verify, "fmspc")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mrsigner", "00" * 32),
        ("isvprodid", 1),
        ("attributes", "15000000000000000000000000000000"),  # the QE's, but the mask keeps bit 2 out
        ("miscselect", "00000001"),
    ],
)
def test_qe_identity_mismatch_refused(lab: Lab, field: str, value: object) -> None:
    lab.qe_identity[field] = value
    _refused(lab.verify, "qe_identity")


def test_qe_tcb_levels(lab: Lab) -> None:
    levels = lab.qe_identity["tcbLevels"]
    lab.qe_identity["tcbLevels"] = [
        {"tcb": {"isvsvn": 5}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
        {"tcb": {"isvsvn": 4}, "tcbDate": "2023-01-01T00:00:00Z", "tcbStatus": "OutOfDate", "advisoryIDs": ["SA-QE"]},
    ]
    # An out-of-date QE makes an up-to-date platform OutOfDate (Intel's convergence); advisories merge.
    lab.tcb_info["tcbLevels"] = [_level(PCK, 11, TEE, "SWHardeningNeeded", "SA-P")]
    assert lab.status() == ("OutOfDate", ["SA-P", "SA-QE"])
    lab.tcb_info["tcbLevels"] = [_level(PCK, 11, TEE, "ConfigurationNeeded")]
    assert lab.status() == ("OutOfDateConfigurationNeeded", ["SA-QE"])
    assert lab.verify().details["qe_tcb_status"] == "OutOfDate"
    lab.qe_identity["tcbLevels"][1]["tcbStatus"] = "Revoked"
    _refused(lab.verify, "qe_identity")
    lab.qe_identity["tcbLevels"] = [levels[0] | {"tcb": {"isvsvn": 5}}]
    assert "below every" in _refused(lab.verify, "qe_identity").message


def test_tcb_level_selection(lab: Lab) -> None:
    up = _level([4] + PCK[1:], 11, TEE, "UpToDate")  # needs component 0 >= 4: not met
    sw = _level(PCK, 12, TEE, "SWHardeningNeeded")  # needs PCESVN 12: not met
    tdx_newer = _level(PCK, 11, [3, 0, 5], "ConfigurationNeeded")  # needs TEE TCB SVN[2] >= 5: not met
    ood = _level(PCK, 11, TEE, "OutOfDate", "SA-1", "SA-2")  # met
    old = _level([1], 1, [1], "OutOfDateConfigurationNeeded", "SA-0")  # met, but later in the list
    lab.tcb_info["tcbLevels"] = [up, sw, tdx_newer, ood, old]
    assert lab.status() == ("OutOfDate", ["SA-1", "SA-2"])
    lab.tcb_info["tcbLevels"] = [up, sw, tdx_newer, old]
    assert lab.status() == ("OutOfDateConfigurationNeeded", ["SA-0"])
    lab.tcb_info["tcbLevels"] = [_level(PCK, 11, TEE, "ConfigurationAndSWHardeningNeeded", "SA-3"), ood]
    assert lab.status() == ("ConfigurationAndSWHardeningNeeded", ["SA-3"])
    lab.tcb_info["tcbLevels"] = [up, sw, tdx_newer]
    err = _refused(lab.verify, "tcb_status")
    assert "no TCB level" in err.message
    lab.tcb_info["tcbLevels"] = [up, _level(PCK, 11, TEE, "Revoked", "SA-R")]
    assert "Revoked" in _refused(lab.verify, "tcb_status").message
    lab.tcb_info["tcbLevels"] = [_level(PCK, 11, TEE, "Unheard-of")]
    _refused(lab.verify, "collateral")


def test_tcb_info_for_sgx_or_wrong_version_refused(lab: Lab) -> None:
    for field, value in (("id", "SGX"), ("version", 2), ("tcbType", 1)):
        changed = copy.deepcopy(lab)
        changed.tcb_info[field] = value
        _refused(changed.verify, "collateral")
    lab.qe_identity["id"] = "QE"
    _refused(lab.verify, "collateral")


def test_tdx_module_mrsigner_and_attributes(lab: Lab) -> None:
    lab.tcb_info["tdxModule"]["mrsigner"] = "01" * 48
    _refused(lab.verify, "tdx_module")
    lab.tcb_info["tdxModule"] |= {"mrsigner": "00" * 48, "attributes": "0100000000000000"}
    _refused(lab.verify, "tdx_module")
    lab.tcb_info["tdxModule"]["attributesMask"] = "0000000000000000"
    lab.tcb_info["tdxModule"]["attributes"] = "0000000000000000"
    assert lab.status()[0] == "UpToDate"


def _module_identity(status: str = "UpToDate") -> dict[str, Any]:
    return {
        "id": "TDX_01",
        "mrsigner": "00" * 48,
        "attributes": "0000000000000000",
        "attributesMask": "FFFFFFFFFFFFFFFF",
        "tcbLevels": [
            {"tcb": {"isvsvn": 5}, "tcbDate": "2024-01-01T00:00:00Z", "tcbStatus": "UpToDate"},
            {"tcb": {"isvsvn": 3}, "tcbDate": "2023-01-01T00:00:00Z", "tcbStatus": status, "advisoryIDs": ["SA-M"]},
        ],
    }


def test_tdx_module_identity_when_tee_tcb_svn1_is_set() -> None:
    # TEE_TCB_SVN (3, 1, 4): TDX module major version 1, SVN 3. TCB levels then compare from index 2,
    # and the module's own status comes from the TCB info's TDX_01 identity.
    body = bytearray(TDX_QUOTE[48 : 48 + 584])
    body[1] = 1
    lab = _tdx_lab([_level(PCK, 11, [9, 9, 4], "UpToDate")], body=bytes(body))  # indexes 0, 1 skipped
    _refused(lab.verify, "tdx_module")  # no tdxModuleIdentities
    lab.tcb_info["tdxModuleIdentities"] = [_module_identity("OutOfDate")]
    d = lab.verify().details
    assert (d["tcb_status"], d["tdx_module_tcb_status"], d["advisory_ids"]) == ("OutOfDate", "OutOfDate", ["SA-M"])
    lab.tcb_info["tdxModuleIdentities"] = [_module_identity("Revoked")]
    _refused(lab.verify, "tdx_module")
    lab.tcb_info["tdxModuleIdentities"] = [_module_identity() | {"tcbLevels": [_module_identity()["tcbLevels"][0]]}]
    assert "below every" in _refused(lab.verify, "tdx_module").message
    lab.tcb_info["tdxModuleIdentities"] = [_module_identity() | {"id": "TDX_02"}]
    _refused(lab.verify, "tdx_module")
    lab.tcb_info["tdxModuleIdentities"] = [_module_identity() | {"mrsigner": "ff" * 48}]
    _refused(lab.verify, "tdx_module")


def test_td15_body_reports_current_status_from_tee_tcb_svn2() -> None:
    body = TDX_QUOTE[48:BODY_END] + bytes([3, 0, 6]) + bytes(13) + bytes(48)
    header = struct.pack("<H", 5) + TDX_QUOTE[2:48]
    lab = _tdx_lab(
        [_level(PCK, 11, [3, 0, 6], "UpToDate"), _level(PCK, 11, TEE, "OutOfDate", "SA-L")],
        header=header,
        descriptor=struct.pack("<HI", 3, 648),
        body=body,
    )
    d = lab.verify().details
    # The launch TCB (TEE_TCB_SVN 3,0,4) is out of date; the module now running (TEE_TCB_SVN_2 3,0,6)
    # would be up to date: reported, but the launch status is the one appraised.
    assert (d["tcb_status"], d["current_tcb_status"], d["advisory_ids"]) == ("OutOfDate", "UpToDate", ["SA-L"])
    assert d["version"] == 5 and d["body_type"] == 3


def test_forged_sgx_collateral_levels() -> None:
    # The genuine SGX PCK: CPU SVN components (11,11,2,2,255,1,0,...), PCESVN 13; QE ISVSVN 10, ISVPRODID 1.
    doc = _sgx_doc()
    tcb_info = json.loads(doc["tcb_info"]) | {"issueDate": "2020-01-01T00:00:00Z", "nextUpdate": "2040-01-01T00:00:00Z"}
    qe_identity = json.loads(doc["qe_identity"]) | {
        "issueDate": "2020-01-01T00:00:00Z",
        "nextUpdate": "2040-01-01T00:00:00Z",
    }
    tcb_info["tcbLevels"] = [
        _level([11, 11, 2, 2, 255, 1, 1], 13, None, "UpToDate"),
        _level([11, 11, 2, 2, 255, 1], 13, None, "SWHardeningNeeded", "SA-9"),
    ]
    lab = Lab(forge(SGX_QUOTE), tcb_info, qe_identity, [], [], ec.generate_private_key(ec.SECP256R1()))
    assert lab.status() == ("SWHardeningNeeded", ["SA-9"])
    lab.tcb_info["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][6]["svn"] = 0
    assert lab.status() == ("UpToDate", [])
    lab.tcb_info["tcbLevels"][0]["tcb"]["sgxtcbcomponents"] = lab.tcb_info["tcbLevels"][0]["tcb"]["sgxtcbcomponents"][
        :15
    ]
    _refused(lab.verify, "collateral")


def test_evaluate_rejects_misuse(lab: Lab) -> None:
    q = parse_tdx_quote(lab.forged.quote)
    with pytest.raises(ValueError):
        evaluate(q, lab.collateral(), roots=[lab.forged.root], now=datetime(2023, 7, 1))
    with pytest.raises(TypeError):
        evaluate(q, "collateral", roots=[lab.forged.root], now=TDX_AT)  # type: ignore[arg-type]
    assert evaluate(q, lab.collateral(), roots=[lab.forged.root], now=TDX_AT).tcb_status == "UpToDate"
    # Called on its own, evaluate still pins the quote's PCK chain (its CA and root check the CRLs).
    _refused(lambda: evaluate(q, lab.collateral(), roots=None, now=TDX_AT), "root")


def test_collateral_validity_window(lab: Lab) -> None:
    lab.tcb_info["nextUpdate"] = "2023-06-30T23:59:59Z"
    err = _refused(lab.verify, "collateral")
    assert err.details["item"] == "TCB info" and err.details["next_update"] == "2023-06-30T23:59:59+00:00"
    assert lab.verify(now=datetime(2023, 6, 30, 12, tzinfo=UTC)).details["collateral_expires"].startswith("2023-06-30")
    lab.qe_identity["issueDate"] = "2023-06-30T13:00:00Z"
    assert (
        _refused(lambda: lab.verify(now=datetime(2023, 6, 30, 12, tzinfo=UTC)), "collateral").details["item"]
        == "QE identity"
    )
    lab.qe_identity["issueDate"] = "yesterday"
    _refused(lab.verify, "collateral")


# --------------------------------------------------------------------------- appraisal (offline / CLI)


@pytest.mark.parametrize(
    ("status", "allowed", "refused_by_default"),
    [
        ("UpToDate", True, False),
        ("SWHardeningNeeded", True, False),
        ("ConfigurationAndSWHardeningNeeded", True, False),
        ("OutOfDate", True, True),
        ("OutOfDateConfigurationNeeded", True, True),
    ],
)
def test_offline_appraisal_of_tcb_status(lab: Lab, status: str, allowed: bool, refused_by_default: bool) -> None:
    from sealroom.attestation.offline import verify_platform_evidence

    lab.tcb_info["tcbLevels"] = [_level(PCK, 11, TEE, status, "SA-X")]
    f, collateral = lab.forged, lab.collateral()

    def run(**kw: Any) -> PlatformClaims:
        return verify_platform_evidence("tdx", f.quote, root=f.root, at=TDX_AT, collateral=collateral, **kw)

    if refused_by_default:
        err = _refused(run, "tcb_status")
        assert err.details["tcb_status"] == status and "--allow-out-of-date" in err.message
    else:
        assert run().details["tcb_status"] == status
    assert run(allow_out_of_date=allowed).details["advisory_ids"] == ["SA-X"]


def test_offline_collateral_only_for_intel(lab: Lab) -> None:
    from sealroom.attestation.offline import verify_platform_evidence

    with pytest.raises(ValueError):
        verify_platform_evidence("snp", b"", collateral=lab.collateral())
