"""AWS Nitro attestation document verifier, against genuine documents (tests/data/nitro/README.md)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sealroom.attestation import cbor
from sealroom.attestation.nitro import AWS_NITRO_ROOT_G1_SHA256, aws_nitro_root_g1, verify_nitro
from sealroom.errors import AttestationError

DATA = Path(__file__).resolve().parents[2] / "data" / "nitro"
DEBUG_B64 = (DATA / "evervault-attestation-doc-debug.b64").read_bytes()
DEBUG_RAW = base64.b64decode(b"".join(DEBUG_B64.split()))
PROD_RAW = (DATA / "evervault-attestation-doc.cbor").read_bytes()
BETA_DEBUG_RAW = (DATA / "evervault-attestation-doc-debug.cbor").read_bytes()
DEBUG_TS = datetime(2023, 9, 18, 15, 3, 30, 860000, tzinfo=UTC)


def _refused(document: bytes, check: str | tuple[str, ...] | None = None, **kwargs: object) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        verify_nitro(document, **kwargs)  # type: ignore[arg-type]
    if check is not None:
        checks = (check,) if isinstance(check, str) else check
        assert info.value.details["check"] in checks, info.value.details
    return info.value


def _parts(raw: bytes) -> list:
    outer = cbor.loads(raw)
    return outer.value if isinstance(outer, cbor.Tagged) else outer


def test_bundled_root_matches_pin() -> None:
    assert aws_nitro_root_g1().fingerprint(hashes.SHA256()).hex() == AWS_NITRO_ROOT_G1_SHA256


def test_debug_document_base64_verifies_at_its_timestamp() -> None:
    claims = verify_nitro(DEBUG_B64)
    assert claims.platform == "nitro"
    assert claims.debug is True
    assert claims.issued_at == DEBUG_TS
    assert claims.measurement == "00" * 48
    assert set(claims.measurements) >= {"pcr0", "pcr1", "pcr2", "pcr8"}
    assert claims.nonce is not None and len(claims.nonce) == 256
    tls = x509.load_der_x509_certificate((DATA / "evervault-bound-tls-cert.der").read_bytes())
    spki = tls.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert claims.report_data == spki
    assert claims.details["module_id"] == "i-0918f6c55e3b61d89-enc018aa8b8e2285d13"
    assert claims.details["public_key_present"] is False
    # the same document as raw CBOR, with an explicit clock, and wrapped in tag 18
    assert verify_nitro(DEBUG_RAW, now=DEBUG_TS + timedelta(minutes=5)) == claims
    assert verify_nitro(b"\xd2" + DEBUG_RAW) == claims
    assert claims.to_json_dict()["platform"] == "nitro"


def test_raw_non_debug_document_verifies() -> None:
    claims = verify_nitro(PROD_RAW)
    assert claims.debug is False
    assert claims.measurement == claims.measurements["pcr0"] != "00" * 48
    assert claims.measurements["pcr8"] != "00" * 48
    assert claims.report_data == b""  # user_data is null in this document
    assert claims.nonce is not None and len(claims.nonce) == 256


def test_beta_debug_document_with_public_key_verifies() -> None:
    claims = verify_nitro(BETA_DEBUG_RAW)
    assert claims.debug is True
    assert claims.nonce is None
    assert claims.details["public_key_present"] is True


def _payload_and_signature_offsets(raw: bytes) -> tuple[int, int, int]:
    parts = _parts(raw)
    payload, signature = parts[2], parts[3]
    p = raw.index(payload)
    s = raw.rindex(signature)
    assert s == len(raw) - len(signature)
    return p, len(payload), s


@pytest.mark.parametrize("step", [0, 1])
def test_single_byte_flips_in_payload_are_refused(step: int) -> None:
    start, length, _ = _payload_and_signature_offsets(DEBUG_RAW)
    offsets = sorted({start, start + length - 1, *range(start + step, start + length, 97)})
    for offset in offsets:
        mutated = bytearray(DEBUG_RAW)
        mutated[offset] ^= 0x01
        _refused(bytes(mutated))


def test_single_byte_flips_in_signature_are_refused() -> None:
    _, _, start = _payload_and_signature_offsets(DEBUG_RAW)
    for offset in range(start, len(DEBUG_RAW), 5):
        mutated = bytearray(DEBUG_RAW)
        mutated[offset] ^= 0x80
        _refused(bytes(mutated), "signature")


def _self_signed_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not aws")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2040, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA384())
    )


def test_wrong_root_is_refused() -> None:
    _refused(DEBUG_RAW, "root", roots=[_self_signed_root()])
    _refused(DEBUG_RAW, "root", roots=[])


def test_expired_leaf_is_refused() -> None:
    _refused(DEBUG_RAW, "chain", now=DEBUG_TS + timedelta(days=1))
    _refused(DEBUG_RAW, "chain", now=DEBUG_TS - timedelta(days=1))


def test_truncated_and_trailing_bytes_are_refused() -> None:
    for cut in (1, 2, 50, len(DEBUG_RAW) // 2, len(DEBUG_RAW) - 1):
        _refused(DEBUG_RAW[:-cut], "format")
    _refused(DEBUG_RAW + b"\x00", "format")
    _refused(b"", "format")
    _refused(b"not base64 at all!", "format")


def _rebuild(parts: list) -> bytes:
    return cbor.dumps(parts)


def test_reencoding_round_trips() -> None:
    assert _rebuild(_parts(DEBUG_RAW)) == DEBUG_RAW
    assert cbor.dumps(cbor.loads(_parts(DEBUG_RAW)[2])) == _parts(DEBUG_RAW)[2]


def test_wrong_algorithm_is_refused() -> None:
    parts = _parts(DEBUG_RAW)
    parts[0] = cbor.dumps({1: -7})
    _refused(_rebuild(parts), ("format", "signature"))
    parts[0] = cbor.dumps({1: -35, 4: b"kid"})
    _refused(_rebuild(parts), ("format", "signature"))


def test_missing_or_mistyped_fields_are_refused() -> None:
    parts = _parts(DEBUG_RAW)
    payload = cbor.loads(parts[2])
    cases: list[tuple[str, object]] = [
        ("module_id", None),
        ("digest", "SHA256"),
        ("timestamp", "now"),
        ("pcrs", {0: "zero"}),
        ("certificate", "x"),
        ("cabundle", []),
        ("user_data", 5),
        ("nonce", True),
    ]
    for name, value in cases:
        mutated = dict(payload)
        if value is None:
            del mutated[name]
        else:
            mutated[name] = value
        _refused(_rebuild([parts[0], parts[1], cbor.dumps(mutated), parts[3]]), "format")
    # a well-formed payload with a changed field is caught by the signature
    mutated = dict(payload, user_data=b"attacker")
    _refused(_rebuild([parts[0], parts[1], cbor.dumps(mutated), parts[3]]), "signature")
    _refused(_rebuild(parts[:3]), "format")
    _refused(cbor.dumps([parts[0], parts[1], cbor.dumps([1, 2]), parts[3]]), "format")


def test_cabundle_not_starting_at_root_is_refused() -> None:
    parts = _parts(DEBUG_RAW)
    payload = cbor.loads(parts[2])
    payload["cabundle"] = payload["cabundle"][1:]
    _refused(_rebuild([parts[0], parts[1], cbor.dumps(payload), parts[3]]), "root")


@pytest.mark.parametrize(
    "data",
    [
        b"\x9f\x01\xff",  # indefinite array
        b"\x5f\x41\x00\xff",  # indefinite byte string
        b"\xa2\x01\x01\x01\x02",  # duplicate key
        b"\xf9\x3c\x00",  # half float
        b"\xf7",  # undefined
        b"\xc1\x01",  # tag 1
        b"\x1c",  # reserved additional info
        b"\x5a\xff\xff\xff\xff",  # byte string longer than input
        b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",  # huge array count
        b"\x81" * 40 + b"\x00",  # too deep
        b"\x01\x02",  # trailing bytes
        b"\x62\xff\xfe",  # invalid UTF-8
        b"\xa1\x80\x00",  # array as map key
    ],
)
def test_cbor_decoder_is_strict(data: bytes) -> None:
    with pytest.raises(cbor.CBORError):
        cbor.loads(data)


def test_cbor_decoder_accepts_basics() -> None:
    assert cbor.loads(b"\xa3\x01\x38\x22\x61a\xf6\x62bc\x83\xf5\xf4\x40") == {
        1: -35,
        "a": None,
        "bc": [True, False, b""],
    }
