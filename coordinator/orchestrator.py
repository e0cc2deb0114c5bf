"""Job orchestration: approvals, the enclave job, the parties' streams, and the verified release.

The coordinator never touches rows or keys: it relays the plan, collects approvals (signatures it
cannot forge), asks each party agent to stream directly to the enclave, and verifies the enclave's
signed result against attestation evidence under its own trust policy before storing it. Any
failure ends the query as failed with a message naming the party or component; the enclave job is
aborted so nothing is released.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from coordinator.store import Store
from sealroom.attestation import AppraisalPolicy, Evidence, report_data_for, verify_evidence
from sealroom.errors import (
    ApprovalError,
    AttestationError,
    JobFailedError,
    SealroomError,
    UnavailableError,
    from_code,
)
from sealroom.plan import Plan, verify_approval
from sealroom.rpc import call, open_channel
from sealroom.v1 import enclave_pb2, enclave_pb2_grpc, party_pb2, party_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedResult:
    doc: dict[str, Any]
    result_json: bytes
    signature: bytes
    arrow_table: bytes
    evidence: bytes


def verify_result(
    response: Any,
    *,
    plan: Plan,
    hpke_public: bytes,
    signing_public: bytes,
    appraisal: AppraisalPolicy,
) -> VerifiedResult:
    """Check the enclave's signed result: evidence, signature, plan and result hashes."""
    evidence = Evidence.from_bytes(response.evidence)
    nonce = bytes.fromhex(plan.hash)
    verify_evidence(
        evidence,
        policy=appraisal,
        expected_report_data=report_data_for(
            hpke_public_key=hpke_public, signing_public_key=signing_public, nonce=nonce
        ),
        expected_nonce=nonce,
    )
    try:
        Ed25519PublicKey.from_public_bytes(signing_public).verify(response.signature, response.result_json)
    except InvalidSignature:
        raise AttestationError(
            "the enclave's result signature does not verify with its attested key",
            details={"check": "result_signature"},
        ) from None
    doc = json.loads(response.result_json)
    if doc.get("plan_hash") != plan.hash or doc.get("query_id") != plan.query_id:
        raise AttestationError("the enclave's result is for another plan", details={"check": "result_plan"})
    if doc.get("result_sha256") != hashlib.sha256(response.arrow_table).hexdigest():
        raise AttestationError(
            "the released table does not match the hash the enclave signed", details={"check": "result_hash"}
        )
    if doc.get("attestation", {}).get("evidence_sha256") != evidence.digest().hex():
        raise AttestationError("the result names other evidence", details={"check": "result_evidence"})
    return VerifiedResult(
        doc,
        bytes(response.result_json),
        bytes(response.signature),
        bytes(response.arrow_table),
        bytes(response.evidence),
    )


class Orchestrator:
    def __init__(
        self,
        store: Store,
        *,
        enclave_address: str,
        appraisal: AppraisalPolicy,
        party_timeout: float = 600.0,
        on_finished: Callable[[str], None] | None = None,
    ):
        self.store = store
        self.enclave_address = enclave_address
        self.appraisal = appraisal
        self.party_timeout = party_timeout
        self.on_finished = on_finished
        self._channels: set[grpc.Channel] = set()
        self._lock = threading.Lock()
        self._stopping = False

    @contextmanager
    def _channel(self, address: str) -> Iterator[grpc.Channel]:
        """A channel that :meth:`shutdown` can close, cancelling the calls in flight on it."""
        channel = open_channel(address)
        with self._lock:
            if self._stopping:
                channel.close()
                raise UnavailableError("the coordinator is shutting down")
            self._channels.add(channel)
        try:
            yield channel
        finally:
            with self._lock:
                self._channels.discard(channel)
            channel.close()

    def shutdown(self) -> None:
        """Cancel every call in flight; their queries end failed (and stay failed after a restart)."""
        with self._lock:
            self._stopping = True
            channels = list(self._channels)
        for ch in channels:
            ch.close()

    def run(self, plan: Plan) -> None:
        qid = plan.query_id
        try:
            self._run(plan)
        except SealroomError as caught:
            err = (
                JobFailedError("the coordinator stopped while this query was in flight; resubmit it")
                if self._stopping
                else caught
            )
            status = "refused" if err.code in ("policy_refusal", "approval", "invalid_query") else "failed"
            log.info("query %s %s: %s", qid, status, err.code)
            self.store.update_query(qid, status=status, error=err.to_dict(), progress=status)
        except Exception as exc:  # noqa: BLE001 - a query must end, whatever happened
            log.error("query %s failed with %s", qid, type(exc).__name__)
            log.debug("traceback", exc_info=exc)
            self.store.update_query(
                qid,
                status="failed",
                error={"code": "internal", "message": "internal error in the coordinator; see its log"},
                progress="failed",
            )
        finally:
            if self.on_finished is not None:
                self.on_finished(qid)

    def _parties(self) -> dict[str, dict[str, Any]]:
        return self.store.parties()

    def _run(self, plan: Plan) -> None:
        qid = plan.query_id
        parties = self._parties()
        involved = plan.involved_parties()
        plan_json = plan.to_json()
        self.store.update_query(qid, status="awaiting_approval", progress=f"approvals 0/{len(involved)}")

        # 1. Approvals: each owner checks the plan against its own policy and signs its hash.
        def review(party: str) -> tuple[str, str, bytes]:
            with self._channel(parties[party]["address"]) as ch:
                resp = call(
                    party,
                    party_pb2_grpc.PartyAgentStub(ch).ReviewPlan,
                    party_pb2.ReviewPlanRequest(plan_json=plan_json, query_id=qid),
                    timeout=self.party_timeout,
                )
            if not resp.approved:
                doc = json.loads(resp.error_json or b"{}")
                err = from_code(doc.get("code", "approval"), doc.get("message", "rejected"), doc.get("details"))
                err.details.setdefault("party", party)
                raise err
            verify_approval(plan.parties[party], resp.plan_hash, bytes(resp.signature), party=party)
            if resp.plan_hash != plan.hash:
                raise ApprovalError(f"{party} approved another plan", details={"party": party})
            return party, resp.plan_hash, bytes(resp.signature)

        with ThreadPoolExecutor(max_workers=max(1, len(involved))) as pool:
            for n, (party, plan_hash, sig) in enumerate(pool.map(review, involved), start=1):
                self.store.add_approval(qid, party, plan_hash, sig)
                self.store.update_query(qid, progress=f"approvals {n}/{len(involved)}")

        # 2. The enclave job: a fresh key pair inside the enclave for this plan.
        self.store.update_query(qid, status="running", progress="creating enclave job")
        with self._channel(self.enclave_address) as ch:
            enclave = enclave_pb2_grpc.EnclaveStub(ch)
            job = call("enclave", enclave.CreateJob, enclave_pb2.CreateJobRequest(plan_json=plan_json))
            try:
                # 3. Each party verifies the enclave's evidence itself and streams sealed batches to it.
                self.store.update_query(qid, progress=f"streaming 0/{len(involved)} parties")

                def contribute(party: str) -> str:
                    with self._channel(parties[party]["address"]) as pch:
                        try:
                            call(
                                party,
                                party_pb2_grpc.PartyAgentStub(pch).Contribute,
                                party_pb2.ContributeRequest(
                                    plan_json=plan_json, job_id=job.job_id, enclave_address=self.enclave_address
                                ),
                                timeout=self.party_timeout,
                            )
                        except SealroomError as err:
                            raise JobFailedError(
                                f"{party} could not contribute: {err.message}",
                                details={**err.details, "party": party, "cause": err.code},
                            ) from None
                    return party

                with ThreadPoolExecutor(max_workers=max(1, len(involved))) as pool:
                    futures = [pool.submit(contribute, p) for p in involved]
                    done = 0
                    for fut in futures:
                        fut.result()
                        done += 1
                        self.store.update_query(qid, progress=f"streaming {done}/{len(involved)} parties")

                # 4. Execute with every approval; the enclave re-verifies them itself.
                self.store.update_query(qid, progress="executing in the enclave")
                approvals = self.store.approvals(qid)
                resp = call(
                    "enclave",
                    enclave.Execute,
                    enclave_pb2.ExecuteRequest(
                        job_id=job.job_id,
                        approvals=[
                            enclave_pb2.Approval(party=p, plan_hash=h, signature=s) for p, (h, s) in approvals.items()
                        ],
                    ),
                    timeout=self.party_timeout,
                )
            except BaseException:
                try:
                    enclave.AbortJob(enclave_pb2.JobRef(job_id=job.job_id), timeout=10)
                except Exception:  # noqa: BLE001, S110 - best effort; the job also expires
                    pass
                raise

        # 5. Verify and store the release.
        verified = verify_result(
            resp,
            plan=plan,
            hpke_public=bytes(job.hpke_public_key),
            signing_public=bytes(job.signing_public_key),
            appraisal=self.appraisal,
        )
        self.store.release(
            qid,
            arrow_table=verified.arrow_table,
            suppressed=verified.doc["suppressed"],
            result_json=verified.result_json,
            signature=verified.signature,
            evidence=verified.evidence,
            simulated=bool(verified.doc["simulated"]),
        )
        if verified.doc["simulated"]:
            log.warning("query %s released under SIMULATED attestation (no TEE)", qid)
        else:
            log.info("query %s released", qid)
