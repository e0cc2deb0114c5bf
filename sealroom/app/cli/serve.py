"""The operator's commands: run the coordinator, an enclave worker or a party agent from its config
file, print the measurement an owner pins, create an owner's signing key, enrol a party, make an
analyst's token.

Each server runs in a process of its own that must load only its own component (a test reads the
modules a started enclave worker has loaded), so each command imports its component when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sealroom.app.cli.common import COMMANDS, EXIT_OK, Subparsers, UsageError, add_command, emit, when, with_json
from sealroom.auth import generate_token, token_hash
from sealroom.keys import generate_signing_key, public_key_hex, save_signing_key

SERVERS = ("coordinator", "enclave", "party")


def add_parsers(sub: Subparsers) -> None:
    handlers = {"coordinator": cmd_coordinator_serve, "enclave": cmd_enclave_serve, "party": cmd_party_serve}
    for name in SERVERS:
        grp = add_command(sub, name).add_subparsers(dest="action", required=True, metavar="ACTION")
        s = grp.add_parser("serve", help=COMMANDS[name].help)  # the serve action says what its word says
        s.add_argument("--config", required=True)
        s.add_argument("--port-file", help="write the bound port here once serving")
        s.set_defaults(handler=handlers[name])
        if name == "enclave":
            m = with_json(grp.add_parser("measure", help="print the measurement a data owner pins"))
            m.add_argument("--config", required=True)
            m.set_defaults(handler=cmd_enclave_measure)
        if name == "party":
            i = with_json(grp.add_parser("init", help="create the owner's Ed25519 signing key"))
            i.add_argument("--key", required=True)
            i.add_argument("--force", action="store_true")
            i.set_defaults(handler=cmd_party_init)
            e = with_json(grp.add_parser("enrol", help="operator: let a new party (or a new key) register"))
            e.add_argument("name", help="the party's name, as its agent's [party] name")
            where = e.add_mutually_exclusive_group(required=True)
            where.add_argument("--config", help="the coordinator's config file (its state_dir is used)")
            where.add_argument("--state-dir", help="the coordinator's state directory")
            e.add_argument("--valid-hours", type=float, default=24.0, help="how long the token is usable (24)")
            e.set_defaults(handler=cmd_party_enrol)
    an = add_command(sub, "analyst").add_subparsers(dest="action", required=True)
    at = with_json(an.add_parser("token", help="make an analyst token and the coordinator config line"))
    at.add_argument("name")
    at.set_defaults(handler=cmd_analyst_token)


def cmd_enclave_serve(args: argparse.Namespace) -> int:
    # Lazy (as every server's): this process is the enclave worker and loads nothing else.
    from enclave_worker.config import EnclaveConfig
    from enclave_worker.server import serve

    serve(EnclaveConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_enclave_measure(args: argparse.Namespace) -> int:
    # Lazy: the enclave worker's code, which the coordinator's and the agents' processes never load.
    from enclave_worker.attester import make_attester
    from enclave_worker.config import EnclaveConfig
    from sealroom.attestation import enclave_measurement

    config = EnclaveConfig.load(Path(args.config))
    if config.attester == "simulated":
        m = enclave_measurement(config.measured())
    else:  # the platform measures the image: ask it, from inside the confidential VM or enclave
        attester = make_attester(config)
        attester.close()
        m = attester.measurement
    if args.json:
        emit({"measurement": m})
    else:
        print(m)
    return EXIT_OK


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    # Lazy (as every server's): this process is the coordinator and loads no other component.
    from coordinator.config import CoordinatorConfig
    from coordinator.servicer import serve

    serve(CoordinatorConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_serve(args: argparse.Namespace) -> int:
    # Lazy (as every server's): this process is the party agent and loads no other component.
    from connectors.agent import PartyConfig, serve

    serve(PartyConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_init(args: argparse.Namespace) -> int:
    key = generate_signing_key()
    save_signing_key(key, Path(args.key), overwrite=args.force)
    if args.json:
        emit({"key": str(args.key), "public_key": public_key_hex(key)})
    else:
        print(f"wrote {args.key} (mode 0600); public key {public_key_hex(key)}")
    return EXIT_OK


def cmd_party_enrol(args: argparse.Namespace) -> int:
    # Lazy: the coordinator's code, run by its operator where its state directory is.
    from coordinator.config import CoordinatorConfig
    from coordinator.service import enrol_party

    if not 0 < args.valid_hours <= 720:
        raise UsageError("--valid-hours must be more than 0 and at most 720 (30 days)")
    state_dir = Path(args.state_dir) if args.state_dir else CoordinatorConfig.load(Path(args.config)).state_dir
    enrolment = enrol_party(state_dir, args.name, valid_seconds=args.valid_hours * 3600)
    line = f'enrolment_token = "{enrolment.token}"'
    if args.json:
        doc = {"party": enrolment.party, "token": enrolment.token, "expires_at": enrolment.expires_at}
        emit(doc | {"config_line": line})
    else:
        print(f"enrolment token for {enrolment.party} (give it to its data owner; it is shown once, used once):")
        print(f"  {enrolment.token}")
        print(f"valid until {when(enrolment.expires_at)}; the owner adds to its agent's [party] table:\n  {line}")
        print("  (or the path of a file holding the token)")
    return EXIT_OK


def cmd_analyst_token(args: argparse.Namespace) -> int:
    if not args.name.isidentifier():
        raise UsageError("analyst names must be identifiers (letters, digits, _)")
    token = generate_token()
    line = f'{args.name} = "{token_hash(token)}"'
    if args.json:
        emit({"analyst": args.name, "token": token, "config_line": line})
    else:
        print(f"token for {args.name} (give it to the analyst; it is shown once):\n  {token}")
        print(f"add to the coordinator's configuration, under [analysts]:\n  {line}")
    return EXIT_OK
