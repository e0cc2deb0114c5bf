"""Intel DCAP collateral (TCB info, QE identity, CRLs): parsing, signatures and evaluation for TDX and SGX.

A DCAP quote proves that a genuine Intel platform signed it; the collateral Intel's Provisioning
Certification Service (PCS) publishes says whether that platform and its Quoting Enclave are still
trustworthy: the TCB info for the platform's FMSPC (``{"tcbInfo": {...}, "signature": hex}``) and
the QE identity (``{"enclaveIdentity": {...}, "signature": hex}``), each signed (raw r||s, ECDSA
P-256/SHA-256 over the exact bytes of the signed JSON value as it appears in the response) by the
Intel SGX TCB Signing certificate, whose issuer chain ends at the Intel SGX Root CA; the PCK CRL
(signed by the PCK Platform or Processor CA) and the root CA CRL (signed by the root).

Security model: nothing in the collateral is trusted before its signature verifies under a pinned
root (the bundled Intel SGX Root CA, or the ``roots`` the caller passes instead); a stale collateral
(``now`` after its ``nextUpdate``) is refused, since a TCB recovery or a revocation may have been
published since. :func:`evaluate` runs these steps, each raising
:class:`~sealroom.errors.AttestationError` with ``details["check"]`` naming it:

1. ``"collateral"``: the TCB info and QE identity issuer chains (TCB Signing -> pinned root, valid at
   ``now``) and signatures; the root CA CRL's signature by the quote's root and the PCK CRL's by the
   quote's PCK CA (the CRL's issuer must be the PCK leaf's issuer); ids and versions (TCB info v3
   ``"TDX"``/``"SGX"``, QE identity v2 ``"TD_QE"``/``"QE"``).
2. ``"collateral"``: freshness: ``issueDate <= now <= nextUpdate`` for the TCB info and QE identity,
   ``lastUpdate <= now <= nextUpdate`` for both CRLs (``details["item"]`` names the stale one).
3. ``"revocation"``: the PCK leaf is not on the PCK CRL; the PCK CA and the TCB Signing certificates
   are not on the root CA CRL.
4. ``"fmspc"``: the PCK leaf's FMSPC and PCE ID equal the TCB info's.
5. ``"qe_identity"``: the QE report's MISCSELECT and ATTRIBUTES (under their masks), MRSIGNER and
   ISVPRODID equal the QE identity's; its ISVSVN reaches a QE TCB level that is not ``Revoked``.
6. ``"tdx_module"`` (TDX): MRSIGNERSEAM and SEAM attributes (under the mask) match the TCB info's
   ``tdxModule``, or, when TEE_TCB_SVN[1] (the TDX module major version) is not 0, the
   ``tdxModuleIdentities`` entry ``TDX_<major>``, whose TCB level for TEE_TCB_SVN[0] must not be
   ``Revoked``.
7. ``"tcb_status"``: the first TCB level (in the published order, newest first) whose SGX components
   are all <= the PCK leaf's CPU SVN components, whose PCESVN is <= the PCK leaf's, and (TDX) whose TDX
   components are all <= the TD report's TEE_TCB_SVN (from index 2 when TEE_TCB_SVN[1] is not 0)
   gives the status; no such level (the platform's TCB is older than any Intel lists) or a
   ``Revoked`` level is refused.

The result's ``tcb_status`` is the platform status converged with the QE's and the TDX module's as
Intel's QVL does (an ``OutOfDate`` QE or module makes an ``UpToDate``/``SWHardeningNeeded``
platform ``OutOfDate``, a ``Configuration...`` one ``OutOfDateConfigurationNeeded``); advisories are
the union of all three. Whether an ``OutOfDate`` or ``SWHardeningNeeded`` status is acceptable is the
relying party's policy (:func:`sealroom.attestation.offline.verify_platform_evidence` refuses the
out-of-date ones unless allowed). For a TD 1.5 report whose TEE_TCB_SVN_2 (the TDX module now running,
after a TD-preserving update) is not zero, the status it would get is reported as
``current_tcb_status``; the launch status (TEE_TCB_SVN) is the one returned and appraised.

Not evaluated: the TDX QE's or platform's TCB levels' ``tcbDate`` against a policy date, and
PCK certificates' own CRL distribution points (the CRLs are supplied with the collateral, not
fetched: this module does no network I/O).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sealroom.attestation import dcap
from sealroom.attestation.encoding import reject_duplicate_keys
from sealroom.attestation.platform import common_name as _common_name
from sealroom.errors import AttestationError

__all__ = [
    "OUT_OF_DATE_STATUSES",
    "check_tcb_status",
    "TCB_STATUSES",
    "Collateral",
    "CollateralResult",
    "SignedStructure",
    "evaluate",
    "load_collateral",
]

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
OUT_OF_DATE_STATUSES = frozenset({"OutOfDate", "OutOfDateConfigurationNeeded"})
_TCB_SIGNING_CN = "Intel SGX TCB Signing"
_TCB_INFO, _QE_IDENTITY = "tcbInfo", "enclaveIdentity"
_COMPONENTS = 16


def _bad(message: str, **extra: object) -> AttestationError:
    return AttestationError(f"collateral: {message}", details={"check": "collateral", **extra})


# --------------------------------------------------------------------------- parsing


_WS = re.compile(r"[ \t\n\r]*")


def _raw_members(text: str) -> dict[str, str]:
    """The top-level members of a JSON object, each as the exact text of its value."""
    decoder = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys)
    out: dict[str, str] = {}

    def skip(pos: int) -> int:
        match = _WS.match(text, pos)
        return match.end() if match else pos

    pos = skip(0)
    if text[pos : pos + 1] != "{":
        raise ValueError("not a JSON object")
    pos = skip(pos + 1)
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            key, pos = decoder.raw_decode(text, pos)
            if not isinstance(key, str):
                raise ValueError("object key is not a string")
            pos = skip(pos)
            if text[pos : pos + 1] != ":":
                raise ValueError("expected ':'")
            pos = skip(pos + 1)
            _, end = decoder.raw_decode(text, pos)
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = text[pos:end]
            pos = skip(end)
            sep = text[pos : pos + 1]
            pos = skip(pos + 1)
            if sep == "}":
                break
            if sep != ",":
                raise ValueError("expected ',' or '}'")
    if skip(pos) != len(text):
        raise ValueError("trailing data after the JSON object")
    return out


def _load_chain(pem: bytes | str, what: str) -> tuple[x509.Certificate, ...]:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise _bad(f"{what} issuer chain is not PEM certificates: {exc}", item=what) from None
    if len(certs) != 2:
        raise _bad(f"{what} issuer chain has {len(certs)} certificates, expected 2 (TCB Signing, root)", item=what)
    return tuple(certs)


def _load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise _bad(f"{what} is not a DER or PEM CRL: {exc}", item=what) from None


@dataclass(frozen=True)
class SignedStructure:
    """A TCB info or QE identity as published: the exact signed bytes, their signature and signer chain."""

    name: str  # "tcbInfo" or "enclaveIdentity"
    body: bytes  # the exact bytes the signature covers
    signature: bytes  # raw r||s
    issuer_chain: tuple[x509.Certificate, ...]  # TCB Signing certificate, root
    fields: Mapping[str, Any]  # the body, parsed

    @classmethod
    def from_parts(cls, name: str, body: bytes | str, signature_hex: str, issuer_chain: bytes | str) -> SignedStructure:
        raw = body.encode() if isinstance(body, str) else body
        try:
            fields = json.loads(raw, object_pairs_hook=reject_duplicate_keys)
            signature = bytes.fromhex(signature_hex)
        except (ValueError, TypeError) as exc:
            raise _bad(f"{name} is not JSON with a hex signature: {exc}", item=name) from None
        if not isinstance(fields, dict):
            raise _bad(f"{name} is not a JSON object", item=name)
        if len(signature) != 64:
            raise _bad(f"{name} signature is {len(signature)} bytes, expected 64 (r||s)", item=name)
        return cls(name, raw, signature, _load_chain(issuer_chain, name), fields)

    @classmethod
    def from_response(cls, name: str, response: bytes, issuer_chain: bytes | str) -> SignedStructure:
        """From a PCS response body ``{"<name>": {...}, "signature": "<hex>"}``: the signed bytes are
        the member's value exactly as it appears in ``response``."""
        try:
            members = _raw_members(response.decode("utf-8"))
            signature = json.loads(members["signature"])
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise _bad(f"{name} response is not {{{name!r}: ..., 'signature': ...}}: {exc}", item=name) from None
        if name not in members or set(members) != {name, "signature"} or not isinstance(signature, str):
            raise _bad(f"{name} response must hold exactly {name!r} and a hex 'signature'", item=name)
        return cls.from_parts(name, members[name], signature, issuer_chain)


@dataclass(frozen=True)
class Collateral:
    """What :func:`evaluate` needs: TCB info, QE identity, PCK CRL and root CA CRL, as published."""

    tcb_info: SignedStructure
    qe_identity: SignedStructure
    pck_crl: x509.CertificateRevocationList
    root_crl: x509.CertificateRevocationList

    @classmethod
    def from_pcs(
        cls,
        *,
        tcb_info: bytes,
        tcb_info_issuer_chain: bytes,
        qe_identity: bytes,
        qe_identity_issuer_chain: bytes,
        pck_crl: bytes,
        root_crl: bytes,
    ) -> Collateral:
        """From Intel PCS responses: TCB info and QE identity bodies, their ``TCB-Info-Issuer-Chain`` and
        ``SGX-Enclave-Identity-Issuer-Chain`` (PEM, URL-decoded), and the CRLs (DER or PEM)."""
        return cls(
            tcb_info=SignedStructure.from_response(_TCB_INFO, tcb_info, tcb_info_issuer_chain),
            qe_identity=SignedStructure.from_response(_QE_IDENTITY, qe_identity, qe_identity_issuer_chain),
            pck_crl=_load_crl(pck_crl, "PCK CRL"),
            root_crl=_load_crl(root_crl, "root CA CRL"),
        )

    @classmethod
    def from_json(cls, data: bytes) -> Collateral:
        """From one JSON document in the ``QuoteCollateralV3`` layout of dcap-qvl and PCCS clients:
        ``tcb_info`` and ``qe_identity`` (the signed JSON, as strings), ``tcb_info_signature`` and
        ``qe_identity_signature`` (hex), ``tcb_info_issuer_chain`` and ``qe_identity_issuer_chain``
        (PEM), ``pck_crl`` and ``root_ca_crl`` (hex DER). A ``pck_crl_issuer_chain`` is ignored: the
        PCK CRL is checked against the PCK CA in the quote's own (verified) chain."""
        try:
            doc = json.loads(data, object_pairs_hook=reject_duplicate_keys)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            texts = {
                k: doc[k]
                for k in (
                    "tcb_info",
                    "tcb_info_signature",
                    "tcb_info_issuer_chain",
                    "qe_identity",
                    "qe_identity_signature",
                    "qe_identity_issuer_chain",
                    "pck_crl",
                    "root_ca_crl",
                )
            }
            if not all(isinstance(v, str) for v in texts.values()):
                raise ValueError("every member must be a string")
            pck_crl, root_crl = bytes.fromhex(texts["pck_crl"]), bytes.fromhex(texts["root_ca_crl"])
        except (UnicodeDecodeError, ValueError, KeyError) as exc:
            raise _bad(f"collateral JSON is not in the QuoteCollateralV3 layout: {exc}") from None
        return cls(
            tcb_info=SignedStructure.from_parts(
                _TCB_INFO, texts["tcb_info"], texts["tcb_info_signature"], texts["tcb_info_issuer_chain"]
            ),
            qe_identity=SignedStructure.from_parts(
                _QE_IDENTITY, texts["qe_identity"], texts["qe_identity_signature"], texts["qe_identity_issuer_chain"]
            ),
            pck_crl=_load_crl(pck_crl, "PCK CRL"),
            root_crl=_load_crl(root_crl, "root CA CRL"),
        )


def load_collateral(path: str | Path) -> Collateral:
    """Collateral from a file (one ``QuoteCollateralV3`` JSON document) or a directory of PCS files.

    In a directory each file is recognised by its content, not its name: a JSON object with a
    ``tcbInfo`` or ``enclaveIdentity`` member; a PEM chain whose first certificate is the Intel SGX TCB
    Signing certificate (one chain serves both; when there are two different ones, the one whose file
    name contains ``qe`` or ``enclave`` is the QE identity's); a DER or PEM CRL, the root CA CRL if the
    Intel SGX Root CA issued it, else the PCK CRL. Other files are ignored; a missing or repeated
    item is refused (``"collateral"``).
    """
    p = Path(path)
    if p.is_file():
        return Collateral.from_json(p.read_bytes())
    if not p.is_dir():
        raise _bad(f"{p} is neither a collateral JSON file nor a directory")
    found: dict[str, list[tuple[str, bytes]]] = {}
    for f in sorted(p.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        kind = _classify(data)
        if kind is not None:
            found.setdefault(kind, []).append((f.name, data))
    for kind in ("tcbInfo", "enclaveIdentity", "pck_crl", "root_crl"):
        items = found.get(kind, [])
        if len(items) != 1:
            names = ", ".join(n for n, _ in items)
            raise _bad(f"{p} holds {len(items)} {kind} files{f' ({names})' if names else ''}, expected one")
    chains = found.get("signing_chain", [])
    distinct = {d for _, d in chains}
    if not chains:
        raise _bad(f"{p} holds no TCB Signing issuer chain (PEM)")
    if len(distinct) == 1:
        tcb_chain = qe_chain = chains[0][1]
    else:
        qe = [d for n, d in chains if "qe" in n.lower() or "enclave" in n.lower()]
        other = [d for n, d in chains if not ("qe" in n.lower() or "enclave" in n.lower())]
        if len(qe) != 1 or len(other) != 1:
            raise _bad(f"{p} holds several different TCB Signing chains; cannot tell which signs what")
        tcb_chain, qe_chain = other[0], qe[0]
    return Collateral.from_pcs(
        tcb_info=found["tcbInfo"][0][1],
        tcb_info_issuer_chain=tcb_chain,
        qe_identity=found["enclaveIdentity"][0][1],
        qe_identity_issuer_chain=qe_chain,
        pck_crl=found["pck_crl"][0][1],
        root_crl=found["root_crl"][0][1],
    )


def _classify(data: bytes) -> str | None:
    if data.lstrip().startswith(b"{"):
        try:
            doc = json.loads(data)
        except ValueError:
            return None
        if isinstance(doc, dict):
            for key in (_TCB_INFO, _QE_IDENTITY):
                if key in doc:
                    return key
        return None
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            return None
        return "signing_chain" if certs and _common_name(certs[0].subject) == _TCB_SIGNING_CN else None
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN X509 CRL-----" in data else x509.load_der_x509_crl(data)
    except ValueError:
        return None
    return "root_crl" if _common_name(crl.issuer) == "Intel SGX Root CA" else "pck_crl"


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class CollateralResult:
    tcb_status: str  # converged platform, QE and TDX module status
    advisory_ids: tuple[str, ...]
    platform_tcb_status: str
    qe_tcb_status: str
    tdx_module_tcb_status: str | None  # TDX with a module identity (TEE_TCB_SVN[1] > 0); else None
    current_tcb_status: str | None  # TD 1.5 reports with a TEE_TCB_SVN_2; else None
    tcb_date: str
    tcb_evaluation_data_number: int
    collateral_expires: datetime  # the earliest nextUpdate of the four items

    def to_details(self) -> dict[str, object]:
        out: dict[str, object] = {
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "platform_tcb_status": self.platform_tcb_status,
            "qe_tcb_status": self.qe_tcb_status,
            "tcb_date": self.tcb_date,
            "tcb_evaluation_data_number": self.tcb_evaluation_data_number,
            "collateral_expires": self.collateral_expires.isoformat(),
        }
        if self.tdx_module_tcb_status is not None:
            out["tdx_module_tcb_status"] = self.tdx_module_tcb_status
        if self.current_tcb_status is not None:
            out["current_tcb_status"] = self.current_tcb_status
        return out


class _Fields:
    """Typed access to a parsed JSON object; a missing or mistyped field is ``"collateral"``."""

    def __init__(self, data: Mapping[str, Any], what: str) -> None:
        self.data, self.what = data, what

    def get(self, key: str, kind: type) -> Any:
        value = self.data.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _bad(f"{self.what} field {key!r} is missing or not a {kind.__name__}", item=self.what)
        return value

    def hex(self, key: str, size: int) -> bytes:
        try:
            value = bytes.fromhex(self.get(key, str))
        except ValueError:
            value = b""
        if len(value) != size:
            raise _bad(f"{self.what} field {key!r} is not {size} bytes of hex", item=self.what)
        return value

    def date(self, key: str) -> datetime:
        try:
            value = datetime.fromisoformat(self.get(key, str).replace("Z", "+00:00"))
        except ValueError:
            raise _bad(f"{self.what} field {key!r} is not an ISO-8601 time", item=self.what) from None
        if value.tzinfo is None:
            raise _bad(f"{self.what} field {key!r} has no time zone", item=self.what)
        return value

    def status(self, key: str = "tcbStatus") -> str:
        value = self.get(key, str)
        if value not in TCB_STATUSES:
            raise _bad(f"{self.what} has an unknown TCB status {value!r}", item=self.what)
        return str(value)

    def advisories(self) -> tuple[str, ...]:
        value = self.data.get("advisoryIDs", [])
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise _bad(f"{self.what} advisoryIDs is not a list of strings", item=self.what)
        return tuple(value)

    def levels(self, key: str = "tcbLevels") -> list[_Fields]:
        value = self.get(key, list)
        if not value or not all(isinstance(v, dict) for v in value):
            raise _bad(f"{self.what} {key} is empty or not a list of objects", item=self.what)
        return [_Fields(v, self.what) for v in value]

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self.what)

    def svns(self, key: str) -> tuple[int, ...]:
        comps = self.get(key, list)
        if len(comps) != _COMPONENTS or not all(isinstance(c, dict) for c in comps):
            raise _bad(f"{self.what} {key} does not list {_COMPONENTS} components", item=self.what)
        return tuple(_Fields(c, self.what).get("svn", int) for c in comps)


def _verify_crl(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str, label: str, now: datetime
) -> datetime:
    if crl.issuer != issuer.subject:
        raise dcap.fail(
            label,
            "collateral",
            f"{what} is issued by {crl.issuer.rfc4514_string()}, not the {_common_name(issuer.subject)}",
            item=what,
        )
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
        raise dcap.fail(label, "collateral", f"{what} signature does not verify", item=what)
    if crl.next_update_utc is None:
        raise dcap.fail(label, "collateral", f"{what} has no nextUpdate", item=what)
    _fresh(what, crl.last_update_utc, crl.next_update_utc, now, label)
    return crl.next_update_utc


def _fresh(what: str, issued: datetime, next_update: datetime, now: datetime, label: str) -> None:
    if not (issued <= now <= next_update):
        stale = now > next_update
        raise dcap.fail(
            label,
            "collateral",
            f"{what} is {'stale' if stale else 'not yet valid'} at {now.isoformat()} "
            f"(issued {issued.isoformat()}, next update {next_update.isoformat()})"
            + ("; fetch a current one from the Intel PCS or your PCCS" if stale else ""),
            item=what,
            issued=issued.isoformat(),
            next_update=next_update.isoformat(),
        )


def _converge(platform: str, other: str) -> str:
    """Intel QVL's convergence of a platform TCB status with an out-of-date QE or TDX module."""
    if other != "OutOfDate":
        return platform
    if platform in ("UpToDate", "SWHardeningNeeded"):
        return "OutOfDate"
    if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
        return "OutOfDateConfigurationNeeded"
    return platform


def _isv_level(levels: list[_Fields], isvsvn: int) -> _Fields | None:
    for level in levels:
        if level.sub("tcb").get("isvsvn", int) <= isvsvn:
            return level
    return None


@dataclass(frozen=True)
class _Appraised:
    """The TCB status a QE, TDX module or platform level gets, and the advisories it lists."""

    status: str
    advisories: tuple[str, ...]


def evaluate(
    q: dcap.Quote,
    collateral: Collateral,
    *,
    roots: Sequence[x509.Certificate] | None,
    now: datetime,
) -> CollateralResult:
    """Evaluate ``collateral`` for a DCAP quote whose own verification (:func:`dcap.verify_quote`) passed.

    The quote's PCK chain is checked again (``"root"``, ``"chain"``): the CRLs are verified with its CA
    and root. The quote's signatures are not: call this after :func:`dcap.verify_quote`.

    ``roots`` replaces the pinned Intel SGX Root CA for the collateral's issuer chains, as it does for
    the quote's PCK chain. Each failed step raises AttestationError naming it (see the module docstring).
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if not isinstance(collateral, Collateral):
        raise TypeError("collateral must be a Collateral (see load_collateral)")
    tdx = q.tee_type == dcap.TEE_TYPE_TDX
    label = "TDX" if tdx else "SGX"
    # The CRLs are checked against the quote's PCK CA and root: make sure, even when called on its own,
    # that they are the pinned ones (verify_tdx / verify_sgx have already checked the rest of the quote).
    dcap.check_chain(q.pck_chain, roots=roots, now=now, label=label)
    leaf, pck_ca, root = q.pck_chain
    tcb_info = _Fields(collateral.tcb_info.fields, "TCB info")
    qe_identity = _Fields(collateral.qe_identity.fields, "QE identity")
    # 1. Signatures and issuer chains; ids and versions.
    for item, what in ((collateral.tcb_info, "TCB info"), (collateral.qe_identity, "QE identity")):
        _verify_signed_structure(item, what, roots=roots, now=now, label=label)
    _check_ids(tcb_info, qe_identity, tdx=tdx, label=label)
    # 2. Freshness (the CRLs' is checked with their signatures): the earliest nextUpdate is the result's.
    expiries = _check_freshness(collateral, tcb_info, qe_identity, pck_ca=pck_ca, root=root, label=label, now=now)
    # 3. Revocation.
    _check_revocation(collateral, leaf=leaf, pck_ca=pck_ca, label=label)
    # 4. Platform identity.
    ext = _check_fmspc(leaf, tcb_info, label=label)
    # 5. QE identity.
    qe = _appraise_qe(q.qe_report, qe_identity, label=label)
    # 6. TDX module.
    module = _appraise_tdx_module(q.body, tcb_info, label=label) if tdx else None
    # 7. Platform TCB level, at launch (TEE_TCB_SVN) and, for a TD 1.5 report, now (TEE_TCB_SVN_2).
    tee_svn, tee_svn2 = _tee_tcb_svns(q) if tdx else (b"", b"")
    level, platform = _appraise_platform(tcb_info, ext, tee_svn, tdx=tdx, label=label)
    current: str | None = None
    if tee_svn2:
        current_level = _covering_level(tcb_info, ext, tee_svn2, tdx=tdx)
        current = current_level.status() if current_level is not None else None
    module_status = module.status if module is not None else None
    status = _converge(_converge(platform.status, qe.status), module_status or "UpToDate")
    advisories = platform.advisories + qe.advisories + (module.advisories if module is not None else ())
    return CollateralResult(
        tcb_status=status,
        advisory_ids=tuple(dict.fromkeys(advisories)),
        platform_tcb_status=platform.status,
        qe_tcb_status=qe.status,
        tdx_module_tcb_status=module_status,
        current_tcb_status=current,
        tcb_date=level.get("tcbDate", str),
        tcb_evaluation_data_number=tcb_info.get("tcbEvaluationDataNumber", int),
        collateral_expires=min(expiries),
    )


def _verify_signed_structure(
    item: SignedStructure, what: str, *, roots: Sequence[x509.Certificate] | None, now: datetime, label: str
) -> None:
    """Step 1: the issuer chain (TCB Signing -> pinned root, valid at ``now``) and the signature."""
    dcap.check_chain(
        item.issuer_chain,
        roots=roots,
        now=now,
        label=label,
        names=(f"{what} TCB Signing", "root"),
        root_check="collateral",
        chain_check="collateral",
        item=what,
    )
    signer = item.issuer_chain[0]
    if _common_name(signer.subject) != _TCB_SIGNING_CN:
        raise dcap.fail(label, "collateral", f"{what} is not signed by an {_TCB_SIGNING_CN} certificate", item=what)
    key = dcap.p256_key(signer.public_key(), label=label, check="collateral", what=f"{what} signing key")
    dcap.verify_raw(
        key,
        item.signature,
        item.body,
        label=label,
        check="collateral",
        what=f"{what} signature by TCB Signing",
        item=what,
    )


def _check_ids(tcb_info: _Fields, qe_identity: _Fields, *, tdx: bool, label: str) -> None:
    """Step 1: TCB info v3 ``"TDX"``/``"SGX"`` of tcbType 0, QE identity v2 ``"TD_QE"``/``"QE"``."""
    expected_ids = (("TDX", 3), ("TD_QE", 2)) if tdx else (("SGX", 3), ("QE", 2))
    for fields, (want_id, want_version) in zip((tcb_info, qe_identity), expected_ids, strict=True):
        got_id, got_version = fields.get("id", str), fields.get("version", int)
        if (got_id, got_version) != (want_id, want_version):
            raise dcap.fail(
                label,
                "collateral",
                f"{fields.what} is {got_id!r} version {got_version}; a {label} quote needs {want_id!r} "
                f"version {want_version}",
                item=fields.what,
            )
    if tcb_info.get("tcbType", int) != 0:
        raise dcap.fail(label, "collateral", "TCB info tcbType is not 0", item="TCB info")


def _check_freshness(
    collateral: Collateral,
    tcb_info: _Fields,
    qe_identity: _Fields,
    *,
    pck_ca: x509.Certificate,
    root: x509.Certificate,
    label: str,
    now: datetime,
) -> list[datetime]:
    """Step 2: the CRLs (with their signatures), then the TCB info and QE identity, current at ``now``;
    the four items' nextUpdate."""
    expiries = [
        _verify_crl(collateral.root_crl, root, "root CA CRL", label, now),
        _verify_crl(collateral.pck_crl, pck_ca, "PCK CRL", label, now),
    ]
    for fields in (tcb_info, qe_identity):
        issued, next_update = fields.date("issueDate"), fields.date("nextUpdate")
        _fresh(fields.what, issued, next_update, now, label)
        expiries.append(next_update)
    return expiries


def _check_revocation(collateral: Collateral, *, leaf: x509.Certificate, pck_ca: x509.Certificate, label: str) -> None:
    """Step 3: neither the PCK CA nor the TCB Signing certificates on the root CA CRL, nor the PCK leaf
    on the PCK CRL."""
    revocable = [
        (collateral.root_crl, pck_ca, "PCK CA"),
        (collateral.root_crl, collateral.tcb_info.issuer_chain[0], "TCB info signing certificate"),
        (collateral.root_crl, collateral.qe_identity.issuer_chain[0], "QE identity signing certificate"),
        (collateral.pck_crl, leaf, "PCK leaf"),
    ]
    for crl, cert, what in revocable:
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is not None:
            raise dcap.fail(
                label,
                "revocation",
                f"the {what} (serial {cert.serial_number:x}) is revoked since {entry.revocation_date_utc.isoformat()}",
                certificate=what,
                serial=f"{cert.serial_number:x}",
            )


def _check_fmspc(leaf: x509.Certificate, tcb_info: _Fields, *, label: str) -> dcap.PckExtensions:
    """Step 4: the PCK leaf's FMSPC and PCE ID are the TCB info's; what the leaf certifies."""
    ext = dcap.pck_extensions(leaf, label=label, check="fmspc")
    fmspc, pce_id = tcb_info.hex("fmspc", 6).hex(), tcb_info.hex("pceId", 2).hex()
    if (fmspc, pce_id) != (ext.fmspc, ext.pce_id):
        raise dcap.fail(
            label,
            "fmspc",
            f"the TCB info is for FMSPC {fmspc} / PCE ID {pce_id}, the PCK certificate for {ext.fmspc} / {ext.pce_id}; "
            f"fetch the TCB info for FMSPC {ext.fmspc}",
            fmspc=ext.fmspc,
            tcb_info_fmspc=fmspc,
        )
    return ext


def _appraise_qe(qe: bytes, qe_identity: _Fields, *, label: str) -> _Appraised:
    """Step 5: the QE report matches the QE identity, at a QE TCB level that is not ``Revoked``."""
    # Every expected value is read (and so checked well-formed) before any is compared.
    qe_checks = (
        ("MISCSELECT", qe[16:20], qe_identity.hex("miscselect", 4), qe_identity.hex("miscselectMask", 4)),
        ("ATTRIBUTES", qe[48:64], qe_identity.hex("attributes", 16), qe_identity.hex("attributesMask", 16)),
        ("MRSIGNER", qe[128:160], qe_identity.hex("mrsigner", 32), b"\xff" * 32),
    )
    for name, got, want, mask in qe_checks:
        if bytes(a & m for a, m in zip(got, mask, strict=True)) != want:
            raise dcap.fail(label, "qe_identity", f"QE report {name} {got.hex()} does not match the QE identity's")
    qe_prod_id, qe_svn = struct.unpack_from("<HH", qe, 256)
    if qe_prod_id != qe_identity.get("isvprodid", int):
        raise dcap.fail(label, "qe_identity", f"QE report ISVPRODID {qe_prod_id} does not match the QE identity's")
    qe_level = _isv_level(qe_identity.levels(), qe_svn)
    if qe_level is None:
        raise dcap.fail(label, "qe_identity", f"QE ISVSVN {qe_svn} is below every QE identity TCB level", isvsvn=qe_svn)
    qe_status = qe_level.status()
    if qe_status == "Revoked":
        raise dcap.fail(label, "qe_identity", f"QE ISVSVN {qe_svn} is at a Revoked TCB level", isvsvn=qe_svn)
    return _Appraised(qe_status, qe_level.advisories())


def _appraise_tdx_module(body: bytes, tcb_info: _Fields, *, label: str) -> _Appraised | None:
    """Step 6 (TDX): MRSIGNERSEAM and SEAM attributes match the TCB info's TDX module; with a module
    identity (TEE_TCB_SVN[1] > 0), its status (None without one)."""
    tee_svn, mrsignerseam, seam_attributes = body[0:16], body[64:112], body[112:120]
    module_id, module = _tdx_module_identity(tcb_info, tee_svn[1], label=label)
    if mrsignerseam != module.hex("mrsigner", 48):
        raise dcap.fail(label, "tdx_module", f"MRSIGNERSEAM does not match the TCB info's {module_id}")
    masked = bytes(a & m for a, m in zip(seam_attributes, module.hex("attributesMask", 8), strict=True))
    if masked != module.hex("attributes", 8):
        raise dcap.fail(label, "tdx_module", f"SEAM attributes do not match the TCB info's {module_id}")
    if tee_svn[1] == 0:
        return None
    module_level = _isv_level(module.levels(), tee_svn[0])
    if module_level is None or module_level.status() == "Revoked":
        raise dcap.fail(
            label,
            "tdx_module",
            f"TDX module {module_id} SVN {tee_svn[0]} is "
            + ("below every TCB level" if module_level is None else "at a Revoked TCB level"),
            module=module_id,
        )
    return _Appraised(module_level.status(), module_level.advisories())


def _tdx_module_identity(tcb_info: _Fields, major: int, *, label: str) -> tuple[str, _Fields]:
    """The TCB info's identity for the TDX module of this major version: ``tdxModuleIdentities``
    entry ``TDX_<major>`` when it is not 0, else ``tdxModule``; its name and fields."""
    if major == 0:
        return "tdxModule", tcb_info.sub("tdxModule")
    module_id = f"TDX_{major:02X}"
    if "tdxModuleIdentities" not in tcb_info.data:
        raise dcap.fail(
            label,
            "tdx_module",
            f"TEE_TCB_SVN names TDX module {module_id}, but the TCB info has no tdxModuleIdentities",
            module=module_id,
        )
    identities = [m for m in tcb_info.levels("tdxModuleIdentities") if m.get("id", str) == module_id]
    if len(identities) != 1:
        raise dcap.fail(label, "tdx_module", f"the TCB info has no TDX module identity {module_id}", module=module_id)
    return module_id, identities[0]


def _tee_tcb_svns(q: dcap.Quote) -> tuple[bytes, bytes]:
    """A TD report's TEE_TCB_SVN and, for a TD 1.5 report that has one (not zero), its TEE_TCB_SVN_2."""
    tee_svn2 = q.body[584:600] if q.body_type == 3 and any(q.body[584:600]) else b""
    return q.body[0:16], tee_svn2


def _appraise_platform(
    tcb_info: _Fields, ext: dcap.PckExtensions, tee_svn: bytes, *, tdx: bool, label: str
) -> tuple[_Fields, _Appraised]:
    """Step 7: the first TCB level that covers the platform, and its status, which is not ``Revoked``."""
    level = _covering_level(tcb_info, ext, tee_svn, tdx=tdx)
    if level is None:
        tee = f", TEE TCB SVN {tee_svn.hex()}" if tdx else ""
        raise dcap.fail(
            label,
            "tcb_status",
            f"no TCB level in the TCB info covers this platform (CPU SVN components {list(ext.cpu_svn_components)}, "
            f"PCESVN {ext.pce_svn}{tee}): its TCB is older than any Intel lists, or the TCB info is not for it",
            cpu_svn_components=list(ext.cpu_svn_components),
            pce_svn=ext.pce_svn,
        )
    platform_status = level.status()
    if platform_status == "Revoked":
        raise dcap.fail(label, "tcb_status", "the platform's TCB level is Revoked", tcb_date=level.get("tcbDate", str))
    return level, _Appraised(platform_status, level.advisories())


def _covering_level(tcb_info: _Fields, ext: dcap.PckExtensions, tee: bytes, *, tdx: bool) -> _Fields | None:
    """The first TCB level (newest first) whose SGX components and PCESVN the PCK leaf reaches and (TDX)
    whose TDX components ``tee`` reaches (from index 2 when ``tee[1]`` is not 0); None if none."""
    for level in tcb_info.levels():
        tcb = level.sub("tcb")
        if any(p < c for p, c in zip(ext.cpu_svn_components, tcb.svns("sgxtcbcomponents"), strict=True)):
            continue
        if ext.pce_svn < tcb.get("pcesvn", int):
            continue
        if tdx:
            start = 2 if tee[1] > 0 else 0
            if any(tee[i] < c for i, c in enumerate(tcb.svns("tdxtcbcomponents")) if i >= start):
                continue
        return level
    return None


def check_tcb_status(details: Mapping[str, Any], *, allow_out_of_date: bool, how_to_allow: str) -> None:
    """Refuse (check ``"tcb_status"``) claims whose collateral-derived TCB status is out of date,
    unless allowed; ``how_to_allow`` names the switch that allows it (a CLI flag, a config key)."""
    status, advisories = details["tcb_status"], details["advisory_ids"]
    if status in OUT_OF_DATE_STATUSES and not allow_out_of_date:
        raise AttestationError(
            f"the platform's TCB status is {status} (advisories: {', '.join(advisories) or 'none'}): it lacks "
            "security updates Intel has published; refused (update the platform's microcode, BIOS or TDX "
            f"module, or set {how_to_allow} to accept it)",
            details={"check": "tcb_status", "tcb_status": status, "advisory_ids": list(advisories)},
        )
