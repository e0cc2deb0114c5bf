"""``sealroom demo`` and ``sealroom local``: the whole platform on this machine.

The demo generates seeded synthetic data, starts an enclave worker (simulated attestation), a
coordinator and one party agent per organisation as separate processes serving gRPC on
127.0.0.1, and runs each scenario's queries. ``local`` does the same for one query over the
user's own files.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealroom.app.cli.budget import budget_table
from sealroom.app.client import QueryHandle
from sealroom.app.cluster import Cluster, DatasetSpec, PartySpec
from sealroom.app.demo_data import (
    AGE_BANDS,
    BANKS,
    DIAGNOSES,
    HOSPITALS,
    RARE_DIAGNOSIS,
    bank_tables,
    hospital_tables,
    write_parquet,
)
from sealroom.app.demo_dp import BY_AGE_BAND, BY_DIAGNOSIS, registry_parties
from sealroom.app.render import ProgressDisplay, result_document
from sealroom.app.result import render_result
from sealroom.audit.ropa import Collaboration
from sealroom.errors import JobFailedError
from sealroom.policy import DatasetPolicy, DatasetTrust, ProcessingRecord


@dataclass(frozen=True)
class DemoQuery:
    title: str
    sql: str
    note: str = ""
    epsilon: float | None = None  # what a query over dp datasets spends (None: no dp dataset)
    explain: bool = False  # print `explain` first (for dp: the cost and the expected error)


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    parties: Callable[[Path], list[PartySpec]]
    queries: tuple[DemoQuery, ...]
    # For the record of processing (`sealroom audit ropa`): the operator's [collaboration], and what
    # every owner declares in its policy's [processing] (each naming itself the controller).
    collaboration: Collaboration | None = None
    processing: ProcessingRecord | None = None
    budget: bool = False  # show the privacy budget after each query (a collaboration in dp mode)


# What each bank publishes about its dataset: the customer is the privacy unit and a join key only;
# segment and rating may be grouped by; exposure, loans and default flags may only be aggregated
# (exposures clamped to [0, 1e9]); a SUM cell where one customer holds 80 % or more is suppressed.
BANK_POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "customer_id",
        "min_group_size": 5,
        "dominance": {"n": 1, "k": 80},
        "columns": {
            "customer_id": "join_key",
            "segment": "dimension",
            "rating": "dimension",
            "exposure": {"role": "measure", "aggregates": ["sum", "avg", "stddev", "var"], "min": 0, "max": 1e9},
            "loans": {"role": "measure", "aggregates": ["sum", "avg"]},
            "defaulted": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 1},
        },
    }
)
HOSPITAL_POLICY = DatasetPolicy.from_dict(
    {
        "privacy_unit": "patient_id",
        "min_group_size": 5,
        "columns": {
            "patient_id": "join_key",
            # The public group domains: an MPC stage computes every cell of diagnosis x age band,
            # so no party's data reveals which groups it holds.
            "diagnosis": {"role": "dimension", "values": [*DIAGNOSES, RARE_DIAGNOSIS]},
            "age_band": {"role": "dimension", "values": list(AGE_BANDS)},
            "age": {"role": "measure", "aggregates": ["avg"], "min": 0, "max": 110},
            "length_of_stay": {"role": "measure", "aggregates": ["sum", "avg"], "min": 0, "max": 365},
            "cost": {"role": "measure", "aggregates": ["sum", "avg", "stddev"], "min": 0, "max": 1e6},
        },
    }
)


# bank_c's data officer approves each query by hand (approval = "manual" in its policy).
MANUAL_BANK = "bank_c"


def _bank_parties(data_dir: Path) -> list[PartySpec]:
    paths = write_parquet(bank_tables(), data_dir, "exposures")
    manual = dataclasses.replace(BANK_POLICY, approval="manual")
    return [
        PartySpec(
            bank,
            (
                DatasetSpec(
                    "exposures",
                    str(paths[bank]),
                    manual if bank == MANUAL_BANK else BANK_POLICY,
                    "exposure per customer",
                ),
            ),
        )
        for bank in BANKS
    ]


# hospital_east accepts no enclave (trust.mpc_only): its rows never leave it, so the cohort query
# runs as a hybrid plan (the others stream to the enclave, which joins the MPC stage as a player).
MPC_ONLY_HOSPITAL = "hospital_east"


def _hospital_parties(data_dir: Path) -> list[PartySpec]:
    paths = write_parquet(hospital_tables(), data_dir, "stays")
    mpc_only = dataclasses.replace(HOSPITAL_POLICY, trust=DatasetTrust(mpc_only=True))
    return [
        PartySpec(
            h,
            (
                DatasetSpec(
                    "stays",
                    str(paths[h]),
                    mpc_only if h == MPC_ONLY_HOSPITAL else HOSPITAL_POLICY,
                    "inpatient stays, one row per patient",
                ),
            ),
        )
        for h in HOSPITALS
    ]


# What the owners declare for the record of processing (GDPR Article 30) in [processing].
BANK_PROCESSING = ProcessingRecord(
    purposes=("credit_risk_statistics",),
    legal_basis="legitimate_interests",
    data_subjects=("retail, SME and corporate credit customers",),
    personal_data=("customer identifier", "customer segment", "internal credit rating", "credit exposure",
                   "number of loans", "default flag"),
    retention="source data kept by the bank for 10 years after the end of the customer relationship; "
    "an enclave holds it only for the duration of one query",
)  # fmt: skip
HOSPITAL_PROCESSING = ProcessingRecord(
    purposes=("cohort_statistics",),
    legal_basis="public_task",
    data_subjects=("inpatients",),
    personal_data=("patient identifier", "age and age band", "diagnosis group", "length of stay", "cost of stay"),
    special_categories=("health",),
    special_category_condition="archiving_research_or_statistics",
    retention="medical records kept by the hospital for 20 years after the last stay; an enclave holds them "
    "only for the duration of one query",
)


def _declare_processing(parties: list[PartySpec], processing: ProcessingRecord | None) -> list[PartySpec]:
    """Every dataset's policy with ``processing`` in it, each party naming itself (a synthetic
    organisation) as the controller."""
    if processing is None:
        return parties
    out = []
    for party in parties:
        mine = dataclasses.replace(
            processing,
            controller=f"{party.name.replace('_', ' ').title()} (synthetic demo organisation)",
            contact=f"dpo@{party.name.replace('_', '-')}.example",
        )
        datasets = tuple(
            dataclasses.replace(d, policy=dataclasses.replace(d.policy, processing=mine)) for d in party.datasets
        )
        out.append(dataclasses.replace(party, datasets=datasets))
    return out


BANK = Scenario(
    "bank",
    "Cross-bank risk: three banks join their books on a shared customer id",
    _bank_parties,
    (
        DemoQuery(
            "Shared customers: exposure and default rate by segment and rating",
            """
SELECT a.segment, a.rating,
       COUNT(*) AS shared_customers,
       SUM(a.exposure + b.exposure + c.exposure) AS total_exposure,
       AVG(b.defaulted) AS default_rate
FROM bank_a.exposures a
JOIN bank_b.exposures b ON a.customer_id = b.customer_id
JOIN bank_c.exposures c ON a.customer_id = c.customer_id
GROUP BY a.segment, a.rating
ORDER BY a.segment, a.rating""",
            "the corporate/CCC cell has only three shared customers (minimum group size), and one customer "
            "holds almost all of the private/A cell's exposure (dominance rule): both are suppressed",
        ),
        DemoQuery(
            "Exposure concentration across the three books",
            """
SELECT segment,
       COUNT(DISTINCT customer_id) AS customers,
       SUM(exposure) AS total_exposure,
       STDDEV_SAMP(exposure) AS sd_exposure
FROM (SELECT * FROM bank_a.exposures
      UNION ALL SELECT * FROM bank_b.exposures
      UNION ALL SELECT * FROM bank_c.exposures) books
GROUP BY segment
ORDER BY total_exposure DESC""",
        ),
        DemoQuery(
            "Exposure per customer (refused by the banks' policies)",
            """
SELECT b.customer_id, SUM(a.exposure) AS exposure
FROM bank_a.exposures a JOIN bank_b.exposures b ON a.customer_id = b.customer_id
GROUP BY b.customer_id""",
            "the refusal names the party, dataset, column and rule, and the smallest change that would work",
        ),
        DemoQuery(
            "A query that would output rows (refused)",
            """
SELECT a.customer_id, a.exposure
FROM bank_a.exposures a JOIN bank_b.exposures b ON a.customer_id = b.customer_id""",
        ),
    ),
    collaboration=Collaboration(
        name="Cross-bank credit risk study (synthetic demo)",
        purpose="credit_risk_statistics",
        description="Exposure, concentration and default rates of customers shared by three banks, by segment "
        "and rating; aggregates only",
        contact="risk-study@consortium.example",
        operator="the consortium's platform team (runs the coordinator and the enclave workers)",
        recipients=("credit risk analysts of the participating banks",),
        result_retention="released aggregates are kept 5 years by the analysts' banks",
        log_retention="the audit log and the receipts are kept 10 years by the operator",
    ),
    processing=BANK_PROCESSING,
)

HOSPITAL = Scenario(
    "hospital",
    "Hospital cohort statistics across three sites",
    _hospital_parties,
    (
        DemoQuery(
            "Cohort by diagnosis and age band",
            """
SELECT diagnosis, age_band,
       COUNT(*) AS patients,
       AVG(age) AS mean_age,
       AVG(length_of_stay) AS mean_stay,
       STDDEV_SAMP(cost) AS sd_cost
FROM (SELECT * FROM hospital_north.stays
      UNION ALL SELECT * FROM hospital_south.stays
      UNION ALL SELECT * FROM hospital_east.stays) s
GROUP BY diagnosis, age_band
ORDER BY diagnosis, age_band""",
            "hospital_east accepts no enclave, so the plan is hybrid: hospital_north and hospital_south stream to "
            "the enclave, which joins hospital_east's player (and the coordinator's helper) in an MPC stage; the "
            "rare diagnosis has two patients, so its cells are suppressed inside the MPC, never opened",
        ),
    ),
    collaboration=Collaboration(
        name="Multi-site inpatient cohort statistics (synthetic demo)",
        purpose="cohort_statistics",
        description="Cohort sizes, ages, lengths of stay and costs by diagnosis group and age band across three "
        "hospitals; aggregates only",
        contact="cohort-study@hospitals.example",
        operator="the hospitals' shared research IT (runs the coordinator and the enclave workers)",
        recipients=("epidemiologists of the participating hospitals",),
        result_retention="released aggregates are kept 10 years with the study's records",
        log_retention="the audit log and the receipts are kept 10 years by the operator",
    ),
    processing=HOSPITAL_PROCESSING,
)

REGISTRY = Scenario(
    "registry",
    "Disease registry in dp mode: two hospitals release cohort statistics with differential privacy, "
    "under one budget (epsilon 2) their agents enforce",
    lambda data_dir: registry_parties(data_dir, HOSPITAL_POLICY),
    (
        DemoQuery(
            "Patients and mean stay by diagnosis (epsilon 1)",
            BY_DIAGNOSIS,
            "every diagnosis of the public domain is released with noise, the rare one too: its ±9 interval "
            "hides whether its two patients are in the data; explain showed the cost and the error before "
            "anything ran",
            epsilon=1.0,
            explain=True,
        ),
        DemoQuery("Patients and bed days by age band (epsilon 1)", BY_AGE_BAND, epsilon=1.0),
        DemoQuery(
            "The same cohort again (refused: the collaboration's budget is spent)",
            BY_DIAGNOSIS,
            "each hospital's agent refuses a plan that would exceed its budget, naming the epsilon asked and left",
            epsilon=0.5,
        ),
    ),
    budget=True,
)

SCENARIOS = {"bank": BANK, "hospital": HOSPITAL, "registry": REGISTRY}


def _say(msg: str) -> None:
    print(f"[sealroom] {msg}", file=sys.stderr, flush=True)


def run_demo(*, scenario: str = "all", state_dir: Path | None = None, as_json: bool = False) -> dict[str, Any]:
    names = list(SCENARIOS) if scenario == "all" else [scenario]
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sealroom-demo-")
        state_dir = Path(tmp.name)
    state_dir = Path(state_dir)
    out: dict[str, Any] = {"simulated": True, "state_dir": str(state_dir), "queries": []}
    try:
        for name in names:
            sc = SCENARIOS[name]
            _say(f"scenario {name}: {sc.description}")
            parties = _declare_processing(sc.parties(state_dir / "data" / name), sc.processing)
            with (
                Cluster(state_dir / name, parties, log=_say, collaboration=sc.collaboration) as cluster,
                cluster.client() as client,
            ):
                for q in sc.queries:
                    explained = client.explain(q.sql, epsilon=q.epsilon) if q.explain else None
                    if explained is not None and not as_json:
                        print(f"== explain: {q.title}\n{explained}", flush=True)
                    _say(f"submitting: {q.title}")
                    handle = client.submit(q.sql, epsilon=q.epsilon)
                    approved_by_hand = _wait_approving(cluster, handle)
                    result = client.result(handle.query_id)
                    doc = result_document(result, title=q.title, sql=q.sql.strip())
                    doc["scenario"] = name
                    doc["manual_approvals"] = approved_by_hand
                    if explained is not None:
                        doc["explain"] = explained
                    budget = client.budget() if sc.budget else None
                    if budget is not None:
                        doc["budget"] = budget
                    out["queries"].append(doc)
                    if not as_json:
                        print(render_result(result, title=q.title, sql=q.sql), flush=True)
                        if q.note:
                            print(f"\nnote: {q.note}", flush=True)
                        if budget is not None:
                            print(f"\nprivacy budget after this query:\n{budget_table(budget)}", flush=True)
                        print(flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


def _wait_approving(cluster: Cluster, handle: QueryHandle) -> list[str]:
    """Wait for a query; when an owner with manual approval is awaited, approve as that owner would,
    with the real command: ``sealroom approve QUERY_ID --party-config CONFIG --agent ADDR``."""
    approved: list[str] = []
    last = None
    while True:
        st = handle.status()
        if (st["status"], st["progress"]) != last:
            _say(f"  {st['query_id']}: {st['status']} {st['progress']}")
            last = (st["status"], st["progress"])
        if st["status"] in ("released", "refused", "failed"):
            return approved
        for party in st["awaiting"] if st["status"] == "pending_approval" else []:
            if party in approved:
                continue
            command = cluster.approve_command(handle.query_id, party)
            _say(f"  {party}'s data officer reviews the plan and runs: sealroom {' '.join(command[:-1])}")
            proc = cluster.approve_as_owner(handle.query_id, party)  # the owner's own CLI, as a person would run it
            if proc.returncode != 0:
                raise JobFailedError(f"the demo's manual approval by {party} failed: {proc.stderr.strip()[-300:]}")
            approved.append(party)
        time.sleep(0.1)


def run_local(
    *,
    datasets: dict[str, str],
    sql: str,
    policies: dict[str, DatasetPolicy],
    state_dir: Path | None = None,
    as_json: bool = False,
    epsilon: float | None = None,
) -> dict[str, Any]:
    by_party: dict[str, list[DatasetSpec]] = {}
    for qualified, source in datasets.items():
        party, name = qualified.split(".", 1)
        by_party.setdefault(party, []).append(DatasetSpec(name, source, policies[qualified]))
    parties = [PartySpec(p, tuple(ds)) for p, ds in by_party.items()]
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sealroom-local-")
        state_dir = Path(tmp.name)
    try:
        with Cluster(Path(state_dir), parties, log=_say) as cluster, cluster.client() as client:
            handle = client.submit(sql, epsilon)
            handle.wait(on_progress=None if as_json else ProgressDisplay(prefix="[sealroom] "))
            result = client.result(handle.query_id)
            if not as_json:
                print(render_result(result), flush=True)
            return result_document(result, sql=sql.strip())
    finally:
        if tmp is not None:
            tmp.cleanup()
