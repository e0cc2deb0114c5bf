"""A party's ``RegisterParty`` request as a test builds it: signed by a real Ed25519 key exactly as
``connectors.agent.PartyAgent.registration`` signs it (:class:`sealroom.signing.Registration`), or
forged on purpose (signed by another key, unsigned, replayed) -- the attacker's requests of the
registration tests."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealroom.keys import public_key_hex
from sealroom.policy import DatasetPolicy
from sealroom.signing import Registration
from sealroom.v1 import common_pb2, coordinator_pb2

POLICY = DatasetPolicy(privacy_unit="customer_id", min_group_size=2)
SCHEMA = pa.schema([("customer_id", pa.int64()), ("segment", pa.string())])


def dataset_info(party: str, name: str = "loans", *, policy: DatasetPolicy = POLICY) -> common_pb2.DatasetInfo:
    """One dataset of ``party`` as an agent registers it (a schema and a policy, no rows)."""
    return common_pb2.DatasetInfo(
        party=party,
        name=name,
        arrow_schema=SCHEMA.serialize().to_pybytes(),
        policy_json=policy.canonical(),
        policy_digest=policy.digest(),
        description=f"{name} of {party}",
    )


def registration_request(
    key: Ed25519PrivateKey,
    party: str,
    address: str,
    datasets: Sequence[common_pb2.DatasetInfo] | None = None,
    *,
    enrolment_token: str = "",
    issued_at_ms: int | None = None,
    registered_key: Ed25519PrivateKey | Ed25519PublicKey | None = None,
    signed: bool = True,
) -> coordinator_pb2.RegisterPartyRequest:
    """``party``'s registration of ``registered_key`` (default: ``key``), signed by ``key`` (unless
    ``signed`` is false). ``datasets`` default to one ``loans`` dataset."""
    infos = list(datasets) if datasets is not None else [dataset_info(party)]
    owner = public_key_hex(registered_key or key)
    issued = int(time.time() * 1000) if issued_at_ms is None else issued_at_ms
    reg = Registration.of(party=party, owner_key=owner, address=address, datasets=infos, issued_at_ms=issued)
    return coordinator_pb2.RegisterPartyRequest(
        party=common_pb2.PartyInfo(name=party, address=address, signing_public_key=bytes.fromhex(owner)),
        datasets=infos,
        issued_at_ms=issued,
        signature=reg.sign(key) if signed else b"",
        enrolment_token=enrolment_token,
    )
