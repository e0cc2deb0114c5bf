"""The ``sealroom`` command line. Only :func:`main` exits the process.

Exit status: 0 success (released), 1 refused or failed, 2 unusable arguments. Every command that
prints results has ``--json``: one JSON document on stdout; progress and logs go to stderr.
Imports are lazy so that ``sealroom enclave serve`` loads only what the enclave worker needs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sealroom.app.cli.analyst import cmd_analyst_token, cmd_datasets, cmd_explain, cmd_result, cmd_status, cmd_submit
from sealroom.app.cli.attest import cmd_attest_verify
from sealroom.app.cli.audit import (
    cmd_audit_export,
    cmd_audit_list,
    cmd_audit_ropa,
    cmd_audit_show,
    cmd_audit_verify,
    cmd_receipt_verify,
)
from sealroom.app.cli.common import DEFAULT_COORDINATOR, EXIT_FAILED, EXIT_USAGE, UsageError, emit
from sealroom.app.cli.local import cmd_demo, cmd_local
from sealroom.app.cli.owner import cmd_approve, cmd_pending, cmd_reject, cmd_revoke
from sealroom.app.cli.serve import (
    cmd_coordinator_serve,
    cmd_dev_init,
    cmd_enclave_measure,
    cmd_enclave_serve,
    cmd_party_init,
    cmd_party_serve,
)

# -- serve --------------------------------------------------------------------------------------


# -- analyst ------------------------------------------------------------------------------------


# -- owner: manual approvals --------------------------------------------------------------------


# -- demo and local -----------------------------------------------------------------------------


# -- compliance: receipts and the audit log -----------------------------------------------------


# -- parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sealroom", description="Privacy-preserving joint analytics.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_json(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return sp

    def analyst(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--coordinator", help=f"coordinator address (env SEALROOM_COORDINATOR, default {DEFAULT_COORDINATOR})"
        )
        sp.add_argument(
            "--analyst",
            default=os.environ.get("SEALROOM_ANALYST", ""),
            help="your analyst name (checked against your token where the coordinator authenticates analysts)",
        )
        sp.add_argument("--token", help="your analyst token (env SEALROOM_TOKEN)")
        return with_json(sp)

    d = with_json(sub.add_parser("demo", help="run the whole platform on synthetic data"))
    d.add_argument("--scenario", choices=["bank", "hospital", "all"], default="all")
    d.add_argument("--state-dir", help="keep state, keys, configs and logs here (default: a temporary directory)")
    d.set_defaults(fn=cmd_demo)

    lo = with_json(sub.add_parser("local", help="run one query over your own files"))
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
    lo.set_defaults(fn=cmd_local)

    for name, fn, helptext in (
        ("coordinator", cmd_coordinator_serve, "run the coordinator"),
        ("enclave", cmd_enclave_serve, "run an enclave worker"),
        ("party", cmd_party_serve, "run a data owner's party agent"),
    ):
        grp = sub.add_parser(name, help=helptext).add_subparsers(dest="action", required=True, metavar="ACTION")
        s = grp.add_parser("serve", help=helptext)
        s.add_argument("--config", required=True)
        s.add_argument("--port-file", help="write the bound port here once serving")
        s.set_defaults(fn=fn)
        if name == "enclave":
            m = with_json(grp.add_parser("measure", help="print the measurement a data owner pins"))
            m.add_argument("--config", required=True)
            m.set_defaults(fn=cmd_enclave_measure)
        if name == "party":
            i = with_json(grp.add_parser("init", help="create the owner's Ed25519 signing key"))
            i.add_argument("--key", required=True)
            i.add_argument("--force", action="store_true")
            i.set_defaults(fn=cmd_party_init)

    an = sub.add_parser("analyst", help="analyst credentials").add_subparsers(dest="action", required=True)
    at = with_json(an.add_parser("token", help="make an analyst token and the coordinator config line"))
    at.add_argument("name")
    at.set_defaults(fn=cmd_analyst_token)

    att = sub.add_parser("attest", help="attestation evidence").add_subparsers(dest="action", required=True)
    av = with_json(att.add_parser("verify", help="verify a platform's raw attestation evidence offline"))
    av.add_argument("--format", required=True, choices=["snp", "tdx", "sgx", "nitro"])
    av.add_argument("evidence", help="raw binary, hex or base64 file, as the platform publishes it")
    av.add_argument(
        "--cert", action="append", default=[], help="a certificate the evidence does not carry (SNP: VCEK, ASK)"
    )
    av.add_argument("--root", help="replace the built-in pinned root")
    av.add_argument("--at", help="verify as of this ISO-8601 time (test evidence has expired certificates)")
    av.add_argument("--allow-debug", action="store_true", help="accept evidence from a debug enclave")
    av.add_argument("--expect-measurement", metavar="HEX")
    av.add_argument(
        "--collateral",
        metavar="FILE_OR_DIR",
        help="Intel collateral for a tdx/sgx quote: a QuoteCollateralV3 JSON file, or a directory of PCS files "
        "(TCB info, QE identity, their issuer chain, PCK and root CA CRLs); its TCB status is then appraised",
    )
    av.add_argument(
        "--allow-out-of-date",
        action="store_true",
        help="with --collateral, accept a platform whose TCB status is OutOfDate (Revoked is always refused)",
    )
    av.set_defaults(fn=cmd_attest_verify)

    dev = sub.add_parser("dev", help="development helpers").add_subparsers(dest="action", required=True)
    di = with_json(dev.add_parser("init", help="create the SIMULATED attestation dev root"))
    di.add_argument("--dir", default=str(Path.home() / ".sealroom" / "dev"))
    di.add_argument("--force", action="store_true")
    di.set_defaults(fn=cmd_dev_init)

    rc = sub.add_parser("receipt", help="release receipts").add_subparsers(dest="action", required=True)
    rv = with_json(rc.add_parser("verify", help="verify a release receipt offline"))
    rv.add_argument("file", help="the receipt (JSON)")
    rv.add_argument("--result", help="check that this result file (Arrow IPC stream) is the one released")
    rv.add_argument("--coordinator-key", metavar="HEX_OR_FILE", help="the coordinator's Ed25519 public key to pin")
    rv.add_argument("--trust", metavar="TOML", help="appraise the attestation evidence with this [trust] table")
    rv.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED evidence (no TEE)")
    rv.add_argument("--dev-root", metavar="CRT", help="the dev root certificate (with --allow-simulated)")
    rv.set_defaults(fn=cmd_receipt_verify)

    au = sub.add_parser("audit", help="the compliance reviewer's tools").add_subparsers(dest="action", required=True)
    avf = with_json(au.add_parser("verify", help="verify a transparency log: entries, checkpoints, receipts"))
    src = avf.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", help="an exported log (JSON)")
    src.add_argument("--state-dir", help="a coordinator's state directory (or one above it, e.g. a demo's)")
    avf.add_argument(
        "--witness-key", action="append", default=[], metavar="NAME=HEX", help="a witness whose co-signature counts"
    )
    avf.add_argument("--quorum", type=int, help="witness co-signatures required (default: every --witness-key)")
    avf.add_argument(
        "--checkpoint", action="append", default=[], metavar="FILE", help="a checkpoint seen elsewhere (e.g. a witness)"
    )
    avf.add_argument(
        "--coordinator-key", metavar="HEX_OR_FILE", help="receipts' countersigning key (default: the log key)"
    )

    def reviewer(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--log-key", metavar="HEX_OR_VKEY", help="the log's Ed25519 public key to pin")
        sp.add_argument(
            "--trust", metavar="TOML", help="appraise receipts' attestation evidence with this [trust] table"
        )
        sp.add_argument("--allow-simulated", action="store_true", help="accept SIMULATED evidence (no TEE)")
        sp.add_argument("--dev-root", metavar="CRT", help="the dev root certificate (with --allow-simulated)")
        return sp

    reviewer(avf).set_defaults(fn=cmd_audit_verify)
    state_help = "a coordinator's state directory (or one above it, e.g. a demo's)"
    al = reviewer(with_json(au.add_parser("list", help="list releases with their verification status")))
    al.add_argument("--state-dir", required=True, help=state_help)
    al.add_argument("--since", metavar="ISO", help="only releases at or after this time (UTC unless it says)")
    al.add_argument("--dataset", metavar="PARTY.DATASET", help="only releases that read this dataset")
    al.add_argument("--analyst", metavar="NAME", help="only this analyst's releases")
    al.set_defaults(fn=cmd_audit_list)
    ash = reviewer(with_json(au.add_parser("show", help="one release in words")))
    ash.add_argument("release_id", help="the release's query id")
    ash.add_argument("--state-dir", required=True, help=state_help)
    ash.set_defaults(fn=cmd_audit_show)
    aex = reviewer(with_json(au.add_parser("export", help="export the log (json) or a self-contained report (html)")))
    aex.add_argument("--format", choices=["json", "html"], required=True)
    aex.add_argument("--state-dir", required=True, help=state_help)
    aex.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    aex.set_defaults(fn=cmd_audit_export)
    aro = reviewer(
        with_json(au.add_parser("ropa", help="the record of processing (GDPR Article 30) of each collaboration"))
    )
    aro.add_argument("--state-dir", required=True, help=state_help)
    aro.add_argument(
        "--format",
        choices=["md", "json", "html"],
        default="md",
        help="md (default), json (canonical, versioned: sealroom.audit.ropa) or html (one self-contained page)",
    )
    aro.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    aro.set_defaults(fn=cmd_audit_ropa)

    analyst(sub.add_parser("datasets", help="list registered datasets")).set_defaults(fn=cmd_datasets)
    e = analyst(sub.add_parser("explain", help="show the plan for a query without running it"))
    e.add_argument("sql")
    e.set_defaults(fn=cmd_explain)
    s = analyst(sub.add_parser("submit", help="submit a query"))
    s.add_argument("sql")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--timeout", type=float, default=600.0)
    s.set_defaults(fn=cmd_submit)
    st = analyst(sub.add_parser("status", help="show a query's state (or all queries)"))
    st.add_argument("query_id", nargs="?")
    st.set_defaults(fn=cmd_status)
    r = analyst(sub.add_parser("result", help="print a query's released result"))
    r.add_argument("query_id")
    r.set_defaults(fn=cmd_result)

    def owner(sp: argparse.ArgumentParser, *, signed: bool = True) -> argparse.ArgumentParser:
        sp.add_argument("--agent", help="the party agent's address HOST:PORT (env SEALROOM_PARTY_AGENT)")
        if signed:
            sp.add_argument(
                "--key", help="the party's signing key, as `sealroom party init` wrote it (env SEALROOM_PARTY_KEY)"
            )
            sp.add_argument("query_id")
            sp.add_argument("--plan-hash", help="refuse unless the query's plan has this hash (or a 12+ hex prefix)")
        return with_json(sp)

    owner(sub.add_parser("pending", help="owner: list plans awaiting your decision"), signed=False).set_defaults(
        fn=cmd_pending
    )
    owner(sub.add_parser("approve", help="owner: approve a pending query")).set_defaults(fn=cmd_approve)
    rj = owner(sub.add_parser("reject", help="owner: reject a pending query"))
    rj.add_argument("--reason", required=True, help="why (the analyst sees it)")
    rj.set_defaults(fn=cmd_reject)
    owner(sub.add_parser("revoke", help="owner: revoke your approval before the query runs")).set_defaults(
        fn=cmd_revoke
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from sealroom.errors import SealroomError

    try:
        code = args.fn(args)
    except UsageError as err:
        print(f"sealroom: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except SealroomError as err:
        print(f"sealroom: {err.code}: {err.message}", file=sys.stderr)
        if getattr(args, "json", False):
            emit(
                {
                    "status": "refused" if err.code in ("policy_refusal", "invalid_query") else "failed",
                    "reason": err.to_dict(),
                }
            )
        code = EXIT_USAGE if err.code == "config" else EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
