from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sealroom.app.cli.common import EXIT_FAILED, EXIT_OK, UsageError, emit, parse_pairs


def cmd_demo(args: argparse.Namespace) -> int:
    from sealroom.app.demo import run_demo

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


def cmd_local(args: argparse.Namespace) -> int:
    from connectors.sources import open_source, resolve_spec
    from sealroom.app.demo import run_local
    from sealroom.errors import SealroomError
    from sealroom.policy import DatasetPolicy, load_policy_file

    datasets = parse_pairs(args.dataset, "--dataset")
    if not datasets:
        raise UsageError("give at least one --dataset PARTY.NAME=SOURCE")
    units = parse_pairs(args.privacy_unit, "--privacy-unit")
    policy_files = parse_pairs(args.policy, "--policy")
    if args.min_group_size < 1:
        raise UsageError("--min-group-size must be at least 1")
    policies = {}
    for qualified, source in datasets.items():
        datasets[qualified] = resolve_spec(source, Path.cwd())  # relative paths (sqlite:///b.db too)
        try:
            schema = open_source(datasets[qualified], dataset=qualified).schema
        except SealroomError as err:
            raise UsageError(err.message) from None
        if qualified in policy_files:
            if qualified in units:
                raise UsageError(
                    f"{qualified} has a --policy file; declare its privacy unit there, not with --privacy-unit"
                )
            try:
                policy = load_policy_file(Path(policy_files[qualified]))
            except SealroomError as err:
                raise UsageError(err.message) from None
        else:
            policy = DatasetPolicy(privacy_unit=units.get(qualified), min_group_size=args.min_group_size)
        unit = policy.privacy_unit
        if unit is not None and unit not in schema.names:
            raise UsageError(
                f"the privacy unit of {qualified} ({unit}) is not a column (columns: {', '.join(schema.names)})"
            )
        policies[qualified] = policy
    for flag, given in (("--privacy-unit", units), ("--policy", policy_files)):
        for qualified in given:
            if qualified not in datasets:
                raise UsageError(f"{flag} names {qualified}, which no --dataset defines")
    doc = run_local(
        datasets=datasets,
        sql=args.sql,
        policies=policies,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        as_json=args.json,
    )
    if args.json:
        emit(doc)
    if doc["status"] != "released":
        reason = doc.get("reason", {}).get("message", doc["status"])
        print(f"sealroom local: {doc['status']}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
