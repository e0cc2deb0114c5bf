"""The checks of a plan against its owners' policies: one function per rule, one message per rule.

The planner (:mod:`coordinator.planner`), each owner's agent (:mod:`connectors.agent.review`) and
the enclave (:meth:`enclave_worker.jobs.JobRegistry.create`) all call these, so a rule cannot read
one way in one place and another way in the next, and a policy change changes every verdict at
once. Where a checker knows more (the agent its owner's current policies and registered schemas;
the enclave what it compiled itself), it passes that knowledge in, or adds its own check on top:
never a second version of the same rule.

Rules here: the analyst allow-list (:func:`check_analyst`), the strictest minimum group size
(:func:`strictest_min_group_size`, :func:`check_stage_k`), and no owner-side filter on a column
with declared bounds (:func:`check_no_bounded_filter`). Column roles are
:func:`sealroom.planning.disclosure.check_uses`; a TEE stage's pushed filters are
:func:`sealroom.planning.plan.stage_pushdown`; an MPC stage's consistency and rules are
:func:`sealroom.planning.bounds.stage_consistency_violation` and
:func:`~sealroom.planning.bounds.stage_rule_violation`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sealroom.errors import PolicyRefusalError
from sealroom.planning.plan import Plan, PlanInput, Stage
from sealroom.policy import DatasetPolicy

__all__ = [
    "check_analyst",
    "check_no_bounded_filter",
    "check_plan_analysts",
    "check_stage_k",
    "strictest_datasets",
    "strictest_min_group_size",
]


def strictest_min_group_size(policies: Iterable[DatasetPolicy]) -> int:
    """The strictest (largest) minimum group size of the involved owners: where their rules meet,
    the strictest wins. ValueError without any policy (a stage always has inputs)."""
    sizes = [p.min_group_size for p in policies]
    if not sizes:
        raise ValueError("no policies")
    return max(sizes)


def strictest_datasets(inputs: Iterable[PlanInput]) -> tuple[int, tuple[str, ...]]:
    """The strictest minimum group size of ``inputs`` and the datasets (``party.dataset``, sorted)
    whose policies ask for it (named in suppressed cells' reasons)."""
    listed = list(inputs)
    k = strictest_min_group_size(i.policy for i in listed)
    return k, tuple(sorted(i.qualified for i in listed if i.policy.min_group_size == k))


def check_analyst(analyst: str, *, party: str, dataset: str, policy: DatasetPolicy) -> None:
    """Refuse (rule ``analysts``) when ``policy``, the policy of ``party.dataset``, does not allow
    ``analyst`` to query it; the message says whom to ask."""
    if policy.allows_analyst(analyst):
        return
    raise PolicyRefusalError(
        f"{party}.{dataset} may not be queried by analyst {analyst}: its policy lists the analysts it "
        f"allows; ask {party} to add {analyst}",
        details={
            "party": party,
            "dataset": dataset,
            "rule": "analysts",
            "suggestion": f"ask {party} to allow {analyst}",
        },
    )


def check_plan_analysts(plan: Plan) -> None:
    """Every input of ``plan`` allows its analyst, under the policy the plan carries for it."""
    for inp in plan.inputs():
        check_analyst(plan.analyst, party=inp.party, dataset=inp.dataset, policy=inp.policy)


def check_stage_k(stage: Stage, *, party: str) -> None:
    """Refuse (rule ``min_group_size``) a stage whose minimum group size is weaker than the
    strictest of its inputs' policies (``party``: the owner checking it, named in the refusal)."""
    if stage.min_group_size < strictest_min_group_size(i.policy for i in stage.inputs):
        raise PolicyRefusalError(
            "the plan's minimum group size is weaker than an involved owner's policy",
            details={"party": party, "rule": "min_group_size"},
        )


def check_no_bounded_filter(inp: PlanInput) -> None:
    """Refuse (rule ``bounds``) an owner-side filter on a column with declared bounds: a party
    filters raw values, and the enclave would have clamped them first. Roles already forbid
    filtering on a measure: this keeps it so whatever roles allow."""
    for column in inp.filter_columns:
        rule = inp.policy.rule(column)
        if rule.min is not None or rule.max is not None:
            raise PolicyRefusalError(
                f"{inp.qualified}.{column} has declared bounds and cannot be filtered on by its party",
                details={"party": inp.party, "dataset": inp.dataset, "column": column, "rule": "bounds"},
            )
