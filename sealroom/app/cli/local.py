"""The platform on this machine: ``sealroom demo`` (synthetic scenarios) and ``sealroom local`` (one
query over the user's own files or databases)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from connectors.sources import open_source, resolve_spec
from sealroom.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Subparsers,
    UsageError,
    add_command,
    emit,
    parse_pairs,
    with_epsilon,
    with_json,
)
from sealroom.app.demo import run_demo, run_local
from sealroom.errors import SealroomError
from sealroom.policy import DatasetPolicy, load_policy_file


def add_parsers(sub: Subparsers) -> None:
    d = with_json(add_command(sub, "demo"))
    d.add_argument("--scenario", choices=["bank", "hospital", "registry", "all"], default="all")
    d.add_argument("--state-dir", help="keep state, keys, configs and logs here (default: a temporary directory)")
    d.set_defaults(handler=cmd_demo)

    lo = with_epsilon(with_json(add_command(sub, "local")))
    lo.add_argument("--dataset", action="append", default=[], metavar="PARTY.NAME=SOURCE")
    lo.add_argument("--privacy-unit", action="append", default=[], metavar="PARTY.NAME=COLUMN")
    lo.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="PARTY.NAME=FILE",
        help="the owner's TOML policy for a dataset (default: permissive apart from --min-group-size)",
    )
    lo.add_argument("--min-group-size", type=int, default=5)
    lo.add_argument("--state-dir")
    lo.add_argument("sql")
    lo.set_defaults(handler=cmd_local)


def cmd_demo(args: argparse.Namespace) -> int:
    doc = run_demo(
        scenario=args.scenario, state_dir=Path(args.state_dir) if args.state_dir else None, as_json=args.json
    )
    if args.json:
        emit(doc)
    else:
        n = {s: sum(1 for q in doc["queries"] if q["status"] == s) for s in ("released", "refused", "failed")}
        print(
            f"demo done: {n['released']} released, {n['refused']} refused, {n['failed']} failed (simulated attestation)"
        )
    return EXIT_OK if all(q["status"] in ("released", "refused") for q in doc["queries"]) else EXIT_FAILED


def dataset_policy(
    qualified: str, source: str, *, unit: str | None, policy_file: str | None, min_group_size: int
) -> DatasetPolicy:
    """The policy ``sealroom local`` applies to one dataset: its ``--policy`` file, or a permissive one
    with ``--privacy-unit`` and ``--min-group-size``; its privacy unit must be one of the columns."""
    try:
        schema = open_source(source, dataset=qualified).schema
    except SealroomError as err:
        raise UsageError(err.message) from None
    if policy_file is not None:
        if unit is not None:
            raise UsageError(
                f"{qualified} has a --policy file; declare its privacy unit there, not with --privacy-unit"
            )
        try:
            policy = load_policy_file(Path(policy_file))
        except SealroomError as err:
            raise UsageError(err.message) from None
    else:
        policy = DatasetPolicy(privacy_unit=unit, min_group_size=min_group_size)
    if policy.privacy_unit is not None and policy.privacy_unit not in schema.names:
        raise UsageError(
            f"the privacy unit of {qualified} ({policy.privacy_unit}) is not a column "
            f"(columns: {', '.join(schema.names)})"
        )
    return policy


def local_inputs(
    datasets: dict[str, str], units: dict[str, str], policy_files: dict[str, str], *, min_group_size: int
) -> tuple[dict[str, str], dict[str, DatasetPolicy]]:
    """Each dataset's resolved source and its policy, from ``--dataset``, ``--privacy-unit``,
    ``--policy`` and ``--min-group-size``."""
    if min_group_size < 1:
        raise UsageError("--min-group-size must be at least 1")
    sources: dict[str, str] = {}
    policies: dict[str, DatasetPolicy] = {}
    for qualified, source in datasets.items():
        sources[qualified] = resolve_spec(source, Path.cwd())  # relative paths (sqlite:///b.db too)
        policies[qualified] = dataset_policy(
            qualified,
            sources[qualified],
            unit=units.get(qualified),
            policy_file=policy_files.get(qualified),
            min_group_size=min_group_size,
        )
    for flag, given in (("--privacy-unit", units), ("--policy", policy_files)):
        for qualified in given:
            if qualified not in datasets:
                raise UsageError(f"{flag} names {qualified}, which no --dataset defines")
    return sources, policies


def cmd_local(args: argparse.Namespace) -> int:
    datasets = parse_pairs(args.dataset, "--dataset")
    if not datasets:
        raise UsageError("give at least one --dataset PARTY.NAME=SOURCE")
    units = parse_pairs(args.privacy_unit, "--privacy-unit")
    policy_files = parse_pairs(args.policy, "--policy")
    sources, policies = local_inputs(datasets, units, policy_files, min_group_size=args.min_group_size)
    if args.epsilon is not None and not any(p.dp is not None for p in policies.values()):
        raise UsageError(
            '--epsilon applies to datasets in dp mode ([privacy] mode = "dp" in a --policy file), and no '
            "dataset here is: leave --epsilon out"
        )
    doc = run_local(
        datasets=sources,
        sql=args.sql,
        policies=policies,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        as_json=args.json,
        epsilon=args.epsilon,
    )
    if args.json:
        emit(doc)
    if doc["status"] != "released":
        reason = doc.get("reason", {}).get("message", doc["status"])
        print(f"sealroom local: {doc['status']}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
