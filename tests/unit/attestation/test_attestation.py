"""Attestation: envelope, simulated attester, per-format verification and appraisal.

Real cryptography throughout (ECDSA P-384 dev roots and attestation keys, X.509 path validation);
no mocks. Every refusal is checked for its message and its ``details["check"]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import stat
import struct
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sealroom.attestation import (
    SIMULATED,
    AppraisalPolicy,
    Claims,
    DevRoot,
    Evidence,
    SimulatedAttester,
    dev_init,
    enclave_measurement,
    load_dev_root,
    load_root_certificate,
    report_data_for,
    verify_evidence,
)
from sealroom.errors import AlreadyExistsError, AttestationError, ConfigError

MEASUREMENT = "ab" * 48
OTHER_MEASUREMENT = "cd" * 48
HPKE_PK = bytes(range(32))
SIGNING_PK = bytes(range(32, 64))


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def root(tmp_path: Path) -> DevRoot:
    return dev_init(tmp_path / "dev")


@pytest.fixture
def nonce() -> bytes:
    return secrets.token_bytes(32)


@pytest.fixture
def report_data(nonce: bytes) -> bytes:
    return report_data_for(hpke_public_key=HPKE_PK, signing_public_key=SIGNING_PK, nonce=nonce)


def make_policy(root: DevRoot, **overrides: object) -> AppraisalPolicy:
    kwargs: dict[str, object] = {
        "measurements": frozenset({MEASUREMENT}),
        "allow_simulated": True,
        "simulated_roots": (load_root_certificate(root.cert_path),),
    }
    kwargs.update(overrides)
    return AppraisalPolicy(**kwargs)  # type: ignore[arg-type]


def attest(
    root: DevRoot,
    *,
    report_data: bytes,
    nonce: bytes,
    at: datetime | None = None,
    **attester_kwargs: object,
) -> Evidence:
    kwargs: dict[str, object] = {"measurement": MEASUREMENT}
    kwargs.update(attester_kwargs)
    if at is not None:
        kwargs["clock"] = lambda: at
    attester = SimulatedAttester(root, **kwargs)  # type: ignore[arg-type]
    return attester.attest(report_data=report_data, nonce=nonce)


def refusal(
    evidence: Evidence,
    policy: AppraisalPolicy,
    *,
    report_data: bytes,
    nonce: bytes,
    now: datetime,
    check: str,
    match: str,
) -> AttestationError:
    with pytest.raises(AttestationError, match=match) as excinfo:
        verify_evidence(evidence, policy=policy, expected_report_data=report_data, expected_nonce=nonce, now=now)
    assert excinfo.value.details["check"] == check
    return excinfo.value


def split_evidence(evidence: Evidence) -> tuple[dict[str, object], bytes, bytes]:
    obj = json.loads(evidence.evidence)
    return obj, base64.b64decode(obj["report"]), base64.b64decode(obj["signature"])


def with_payload(evidence: Evidence, report: bytes, signature: bytes) -> Evidence:
    payload = json.dumps(
        {"report": base64.b64encode(report).decode(), "signature": base64.b64encode(signature).decode()},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return replace(evidence, evidence=payload)


# --------------------------------------------------------------------------------------------------
# dev root
# --------------------------------------------------------------------------------------------------


def test_dev_init_writes_root_with_private_key_0600(tmp_path: Path) -> None:
    directory = tmp_path / "nested" / "dev"
    root = dev_init(directory)

    assert root.cert_path == directory / "dev-root.crt"
    assert root.key_path == directory / "dev-root.key"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(root.key_path).st_mode) == 0o600
    assert root.key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert root.cert_path.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")

    cert = root.certificate
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "Sealroom SIMULATED dev attestation root — NOT A TEE"
    )
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    validity = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= validity <= timedelta(days=3654)
    assert {p.name for p in directory.iterdir()} == {"dev-root.crt", "dev-root.key"}


def test_dev_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = dev_init(tmp_path)
    key_before = first.key_path.read_bytes()

    with pytest.raises(AlreadyExistsError, match="already exists.*force"):
        dev_init(tmp_path)
    assert first.key_path.read_bytes() == key_before

    second = dev_init(tmp_path, force=True)
    assert second.key_path.read_bytes() != key_before
    assert stat.S_IMODE(os.stat(second.key_path).st_mode) == 0o600
    assert load_dev_root(tmp_path).certificate == second.certificate


def test_load_dev_root_round_trip_and_errors_name_the_file(tmp_path: Path) -> None:
    root = dev_init(tmp_path)
    loaded = load_dev_root(tmp_path)
    assert loaded.certificate == root.certificate
    assert loaded.private_key.public_key() == root.private_key.public_key()

    with pytest.raises(ConfigError, match="dev-root.crt.*not found") as excinfo:
        load_dev_root(tmp_path / "missing")
    assert excinfo.value.details["file"].endswith("dev-root.crt")

    root.key_path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="dev-root.key"):
        load_dev_root(tmp_path)

    other = dev_init(tmp_path / "other")
    root.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(ConfigError, match="does not match the certificate"):
        load_dev_root(tmp_path)

    root.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match="dev-root.crt: not a PEM or DER"):
        load_root_certificate(root.cert_path)


def test_load_root_certificate_refuses_a_non_ca(root: DevRoot, tmp_path: Path) -> None:
    leaf = SimulatedAttester(root, measurement=MEASUREMENT).certificate
    path = tmp_path / "leaf.crt"
    path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not a CA"):
        load_root_certificate(path)


# --------------------------------------------------------------------------------------------------
# attest -> verify
# --------------------------------------------------------------------------------------------------


def test_round_trip_returns_claims_and_warns(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    attester = SimulatedAttester(root, measurement=MEASUREMENT.upper(), tcb={"svn": 3, "fw": 7})
    evidence = attester.attest(report_data=report_data, nonce=nonce)
    assert evidence.format == SIMULATED
    assert evidence.nonce == nonce
    assert x509.load_der_x509_certificate(evidence.aux) == attester.certificate

    # over the wire and back
    received = Evidence.from_bytes(evidence.to_bytes())
    with caplog.at_level(logging.WARNING, logger="sealroom.attestation.policy"):
        claims = verify_evidence(
            received,
            policy=make_policy(root, min_tcb={"svn": 3}),
            expected_report_data=report_data,
            expected_nonce=nonce,
            now=now,
        )

    assert isinstance(claims, Claims)
    assert claims.platform == "simulated"
    assert claims.simulated is True
    assert claims.measurement == MEASUREMENT
    assert claims.debug is False
    assert dict(claims.tcb) == {"fw": 7, "svn": 3}
    assert claims.report_data == report_data
    assert claims.nonce == nonce
    assert claims.issued_at.tzinfo is not None
    assert abs(claims.issued_at - now) < timedelta(seconds=60)
    as_json = claims.to_json_dict()
    assert as_json["simulated"] is True
    assert as_json["report_data"] == report_data.hex()
    assert as_json["issued_at"].endswith("Z")
    json.dumps(as_json)
    assert any(
        r.levelno == logging.WARNING and "SIMULATED" in r.getMessage() and MEASUREMENT in r.getMessage()
        for r in caplog.records
    )


def test_attester_certificate_is_a_short_lived_leaf(root: DevRoot) -> None:
    cert = SimulatedAttester(root, measurement=MEASUREMENT).certificate
    assert cert.issuer == root.certificate.subject
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "Sealroom simulated attestation key"
    )
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=31)
    cert.verify_directly_issued_by(root.certificate)


def test_refused_when_policy_does_not_allow_simulated(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime
) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    policy = make_policy(root, allow_simulated=False)
    refusal(
        evidence,
        policy,
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="simulated",
        match=("simulated evidence refused: the relying party's trust policy does not set allow_simulated = true"),
    )


def test_refused_when_root_not_pinned(
    root: DevRoot, tmp_path: Path, nonce: bytes, report_data: bytes, now: datetime
) -> None:
    other_root = dev_init(tmp_path / "someone-else")
    evidence = attest(other_root, report_data=report_data, nonce=nonce)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="chain",
        match="does not chain to a pinned simulated root",
    )


def test_refused_when_no_root_pinned(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    refusal(
        evidence,
        make_policy(root, simulated_roots=()),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="chain",
        match="pins no simulated root",
    )


@pytest.mark.parametrize("aux", [b"", b"garbage", b"\x30\x82\xff\xff\x00"])
def test_refused_when_chain_is_not_der_certificates(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, aux: bytes
) -> None:
    evidence = replace(attest(root, report_data=report_data, nonce=nonce), aux=aux)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="chain",
        match="not a list of DER certificates",
    )


def test_refused_when_root_itself_is_presented_as_attestation_key(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime
) -> None:
    # Whoever holds the dev root key must still go through a CA:FALSE attestation key certificate.
    evidence = attest(root, report_data=report_data, nonce=nonce)
    evidence = replace(evidence, aux=root.certificate.public_bytes(serialization.Encoding.DER))
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="chain",
        match="does not chain",
    )


def test_refused_when_report_is_tampered(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    _, report, signature = split_evidence(evidence)
    fields = json.loads(report)
    fields["measurement"] = OTHER_MEASUREMENT
    forged = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    policy = make_policy(root, measurements=frozenset({MEASUREMENT, OTHER_MEASUREMENT}))
    refusal(
        with_payload(evidence, forged, signature),
        policy,
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="signature",
        match="signature does not verify",
    )


def test_refused_when_signature_is_tampered(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    _, report, signature = split_evidence(evidence)
    flipped = bytearray(signature)
    flipped[-1] ^= 0x01
    for bad in (bytes(flipped), b"", b"\x30\x00"):
        refusal(
            with_payload(evidence, report, bad),
            make_policy(root),
            report_data=report_data,
            nonce=nonce,
            now=now,
            check="signature",
            match="signature does not verify",
        )


def test_refused_for_wrong_nonce(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    other = secrets.token_bytes(32)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=other,
        now=now,
        check="nonce",
        match="different nonce",
    )
    # The envelope's (unsigned) nonce swapped to the expected one does not help: the signed one counts.
    refusal(
        replace(evidence, nonce=other),
        make_policy(root),
        report_data=report_data,
        nonce=other,
        now=now,
        check="nonce",
        match="different nonce",
    )


def test_refused_for_wrong_report_data(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    substituted = report_data_for(hpke_public_key=b"\x01" * 32, signing_public_key=SIGNING_PK, nonce=nonce)
    refusal(
        evidence,
        make_policy(root),
        report_data=substituted,
        nonce=nonce,
        now=now,
        check="report_data",
        match="report data does not match",
    )


def test_refused_for_measurement_not_in_allowlist(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime
) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce, measurement=OTHER_MEASUREMENT)
    err = refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="measurement",
        match="not in the trust policy's allowlist",
    )
    assert OTHER_MEASUREMENT in err.message


def test_empty_allowlist_refuses_everything(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    policy = make_policy(root, measurements=frozenset())  # allowed to construct ...
    evidence = attest(root, report_data=report_data, nonce=nonce)
    refusal(  # ... but refuses every enclave
        evidence,
        policy,
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="measurement",
        match="allowlist is\\s+empty",
    )


def test_debug_refused_unless_allowed(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce, debug=True)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="debug",
        match="debug mode",
    )
    claims = verify_evidence(
        evidence,
        policy=make_policy(root, allow_debug=True),
        expected_report_data=report_data,
        expected_nonce=nonce,
        now=now,
    )
    assert claims.debug is True


@pytest.mark.parametrize(
    ("min_tcb", "shown"),
    [({"svn": 4}, "'svn' is 3, below .* minimum 4"), ({"microcode": 1}, "'microcode' is absent")],
)
def test_refused_below_min_tcb(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, min_tcb: dict[str, int], shown: str
) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce, tcb={"svn": 3})
    refusal(
        evidence,
        make_policy(root, min_tcb=min_tcb),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="tcb",
        match=f"TCB component {shown}",
    )


def test_refused_when_stale(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce, at=now - timedelta(minutes=10))
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="freshness",
        match="older than the policy's max_age of 300 s",
    )
    # the same evidence within a longer max_age passes
    policy = make_policy(root, max_age=timedelta(minutes=11))
    claims = verify_evidence(evidence, policy=policy, expected_report_data=report_data, expected_nonce=nonce, now=now)
    assert claims.issued_at == now - timedelta(minutes=10)


def test_refused_when_from_the_future(root: DevRoot, nonce: bytes, report_data: bytes, now: datetime) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce, at=now + timedelta(minutes=10))
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="freshness",
        match="beyond the allowed clock skew of 30 s",
    )
    # within the skew it passes
    evidence = attest(root, report_data=report_data, nonce=nonce, at=now + timedelta(seconds=20))
    claims = verify_evidence(
        evidence, policy=make_policy(root), expected_report_data=report_data, expected_nonce=nonce, now=now
    )
    assert claims.issued_at == now + timedelta(seconds=20)


def test_refused_when_attestation_key_certificate_expired(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime
) -> None:
    later = now + timedelta(days=31)
    attester = SimulatedAttester(root, measurement=MEASUREMENT, clock=lambda: now)
    assert attester.certificate.not_valid_after_utc < later
    # The report itself is fresh at `later`; only the attestation key's certificate has expired.
    attester._clock = lambda: later  # re-date reports, same certificate
    evidence = attester.attest(report_data=report_data, nonce=nonce)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=later,
        check="chain",
        match="not valid at validation time",
    )


@pytest.mark.parametrize("fmt", ["tdx", "sgx", "nitro", "sev-snp"])
def test_simulated_evidence_relabelled_as_hardware_is_refused(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, fmt: str
) -> None:
    evidence = replace(attest(root, report_data=report_data, nonce=nonce), format=fmt)
    with pytest.raises(AttestationError) as info:
        verify_evidence(
            evidence, policy=make_policy(root), expected_report_data=report_data, expected_nonce=nonce, now=now
        )
    assert info.value.details["check"] in ("format", "envelope", "chain")


@pytest.mark.parametrize("fmt", ["snp", "bogus"])
def test_refused_for_unsupported_format(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, fmt: str
) -> None:
    evidence = replace(attest(root, report_data=report_data, nonce=nonce), format=fmt)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="format",
        match=f"evidence format '{fmt}' is not supported yet",
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"report":"AAAA"}',
        b'{"report":"!!!","signature":"AAAA"}',
        b'{"report":"AAAA","signature":"AAAA","extra":1}',
    ],
)
def test_refused_for_malformed_simulated_payload(
    root: DevRoot, nonce: bytes, report_data: bytes, now: datetime, payload: bytes
) -> None:
    evidence = replace(attest(root, report_data=report_data, nonce=nonce), evidence=payload)
    refusal(
        evidence,
        make_policy(root),
        report_data=report_data,
        nonce=nonce,
        now=now,
        check="envelope",
        match="simulated evidence",
    )


def test_verify_rejects_caller_bugs(root: DevRoot, nonce: bytes, report_data: bytes) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    policy = make_policy(root)
    with pytest.raises(ValueError, match="expected_report_data must be 64 bytes"):
        verify_evidence(evidence, policy=policy, expected_report_data=report_data[:32], expected_nonce=nonce)
    with pytest.raises(ValueError, match="expected_nonce must be at least 16 bytes"):
        verify_evidence(evidence, policy=policy, expected_report_data=report_data, expected_nonce=b"")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_evidence(
            evidence,
            policy=policy,
            expected_report_data=report_data,
            expected_nonce=nonce,
            now=datetime.now(),  # naive on purpose
        )
    not_evidence: object = evidence.to_bytes()
    with pytest.raises(TypeError, match="evidence must be an Evidence"):
        verify_evidence(
            not_evidence,  # type: ignore[arg-type]
            policy=policy,
            expected_report_data=report_data,
            expected_nonce=nonce,
        )


def test_attest_rejects_bad_arguments(root: DevRoot, nonce: bytes, report_data: bytes) -> None:
    attester = SimulatedAttester(root, measurement=MEASUREMENT)
    with pytest.raises(ValueError, match="report_data must be 64 bytes"):
        attester.attest(report_data=b"x" * 63, nonce=nonce)
    with pytest.raises(ValueError, match="nonce must be at least 16 bytes"):
        attester.attest(report_data=report_data, nonce=b"short")
    with pytest.raises(ValueError, match="hex"):
        SimulatedAttester(root, measurement="not-hex")
    with pytest.raises(TypeError, match="int"):
        SimulatedAttester(root, measurement=MEASUREMENT, tcb={"svn": "3"})  # type: ignore[dict-item]


def test_policy_is_keyword_only_and_validates() -> None:
    with pytest.raises(TypeError):
        AppraisalPolicy(frozenset({MEASUREMENT}))  # type: ignore[misc]
    with pytest.raises(TypeError, match="not a single string"):
        AppraisalPolicy(measurements=MEASUREMENT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hex"):
        AppraisalPolicy(measurements=frozenset({"xyz"}))
    with pytest.raises(ValueError, match="max_age"):
        AppraisalPolicy(measurements=frozenset(), max_age=timedelta(0))
    policy = AppraisalPolicy(measurements=frozenset({MEASUREMENT.upper()}))
    assert policy.measurements == frozenset({MEASUREMENT})
    assert policy.allow_simulated is False and policy.allow_debug is False
    assert dict(policy.min_tcb) == {}
    assert policy.max_age == timedelta(minutes=5) and policy.clock_skew == timedelta(seconds=30)


# --------------------------------------------------------------------------------------------------
# envelope
# --------------------------------------------------------------------------------------------------

KAT_EVIDENCE = Evidence(
    format="simulated", evidence=b'{"report":"x"}', aux=b"\x30\x03\x02\x01\x01", nonce=bytes(range(16))
)
KAT_ENVELOPE = (
    b'{"aux":"MAMCAQE=","evidence":"eyJyZXBvcnQiOiJ4In0=","format":"simulated",'
    b'"nonce":"AAECAwQFBgcICQoLDA0ODw==","v":1}'
)
KAT_DIGEST = "dae2f73bdfa2140f9fc9c99c539dc9eb424d1e7412de4e9c974e04a68e139775"


def test_evidence_encoding_and_digest_known_answer() -> None:
    assert KAT_EVIDENCE.to_bytes() == KAT_ENVELOPE
    assert KAT_EVIDENCE.digest().hex() == KAT_DIGEST
    assert hashlib.sha256(KAT_ENVELOPE).hexdigest() == KAT_DIGEST
    assert len(KAT_EVIDENCE.digest()) == 32
    assert Evidence.from_bytes(KAT_ENVELOPE) == KAT_EVIDENCE
    assert Evidence.from_bytes(KAT_ENVELOPE).digest().hex() == KAT_DIGEST


def test_evidence_round_trip(root: DevRoot, nonce: bytes, report_data: bytes) -> None:
    evidence = attest(root, report_data=report_data, nonce=nonce)
    again = Evidence.from_bytes(evidence.to_bytes())
    assert again == evidence
    assert again.digest() == evidence.digest()
    assert replace(evidence, nonce=secrets.token_bytes(32)).digest() != evidence.digest()


def _envelope(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "format": "simulated", "evidence": "AAAA", "aux": "", "nonce": "AAAA"}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not _MISSING}).encode()


_MISSING = object()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (KAT_ENVELOPE[:-7], "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"not json at all", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"[" * 100_000, "not valid JSON"),
        (_envelope(nonce=_MISSING), "missing: \\['nonce'\\]"),
        (_envelope(aux=_MISSING, evidence=_MISSING), "missing: \\['aux', 'evidence'\\]"),
        (_envelope(extra="x"), "unknown: \\['extra'\\]"),
        (_envelope(v=2), "version 2"),
        (_envelope(v=True), "version True"),
        (_envelope(format=""), "'format' must be a non-empty string"),
        (_envelope(format=7), "'format' must be a non-empty string"),
        (_envelope(evidence="!!notbase64"), "'evidence' is not valid base64"),
        (_envelope(nonce=12), "'nonce' must be a base64 string"),
        (b'{"v":1,"v":1,"format":"simulated","evidence":"","aux":"","nonce":""}', "duplicate key"),
        (b" " * (1 << 20) + b"{}", "over the 1048576-byte limit"),
    ],
)
def test_from_bytes_refuses_malformed_envelopes(data: bytes, match: str) -> None:
    with pytest.raises(AttestationError, match=match) as excinfo:
        Evidence.from_bytes(data)
    assert excinfo.value.details["check"] == "envelope"


# --------------------------------------------------------------------------------------------------
# report data
# --------------------------------------------------------------------------------------------------

KAT_REPORT_DATA = (
    "38cc3eff711e4ac65b8d6db39fdee9b3e3488b1ebedc475c0657004f770ec765"
    "82e34227bde37738a3ecf9405215fa9c084d2e8fc10a535f76c23cc40d7723a7"
)


def test_report_data_for_known_answer() -> None:
    value = report_data_for(hpke_public_key=HPKE_PK, signing_public_key=SIGNING_PK, nonce=b"n" * 32)
    assert value.hex() == KAT_REPORT_DATA
    # The stored answer is the documented construction.
    expected = hashlib.sha512(
        b"sealroom/v1/report-data"
        + struct.pack(">I", 32)
        + HPKE_PK
        + struct.pack(">I", 32)
        + SIGNING_PK
        + struct.pack(">I", 32)
        + b"n" * 32
    ).digest()
    assert value == expected
    assert len(value) == 64


def test_report_data_for_changes_with_every_input() -> None:
    base = {"hpke_public_key": HPKE_PK, "signing_public_key": SIGNING_PK, "nonce": b"n" * 32}
    reference = report_data_for(**base)
    for name in base:
        changed = dict(base, **{name: base[name][:-1] + b"\x00"})
        assert report_data_for(**changed) != reference, name
    # Length prefixes keep the boundary between fields significant.
    shifted = report_data_for(
        hpke_public_key=HPKE_PK + SIGNING_PK[:1], signing_public_key=SIGNING_PK[1:], nonce=b"n" * 32
    )
    assert shifted != reference
    # Swapping the two keys changes it too.
    assert report_data_for(hpke_public_key=SIGNING_PK, signing_public_key=HPKE_PK, nonce=b"n" * 32) != reference


def test_report_data_for_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="nonce must not be empty"):
        report_data_for(hpke_public_key=HPKE_PK, signing_public_key=SIGNING_PK, nonce=b"")
    with pytest.raises(TypeError, match="hpke_public_key must be bytes"):
        report_data_for(hpke_public_key="key", signing_public_key=SIGNING_PK, nonce=b"n")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        report_data_for(HPKE_PK, SIGNING_PK, b"n")  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def test_enclave_measurement_is_stable_and_covers_config() -> None:
    first = enclave_measurement({"engine": "duckdb", "memory_limit": "1GB"})
    assert first == enclave_measurement({"memory_limit": "1GB", "engine": "duckdb"})  # key order irrelevant
    assert len(first) == 96 and int(first, 16) >= 0 and first == first.lower()
    assert enclave_measurement({"engine": "duckdb", "memory_limit": "2GB"}) != first
    assert enclave_measurement() == enclave_measurement(None) == enclave_measurement({})
    assert enclave_measurement({}) != first
    with pytest.raises(TypeError):
        enclave_measurement({"path": Path("/tmp")})
