from __future__ import annotations

import argparse
from pathlib import Path

from sealroom.app.cli.common import EXIT_OK, emit


def cmd_enclave_serve(args: argparse.Namespace) -> int:
    from enclave_worker.config import EnclaveConfig
    from enclave_worker.server import serve

    serve(EnclaveConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_enclave_measure(args: argparse.Namespace) -> int:
    from enclave_worker.config import EnclaveConfig
    from sealroom.attestation import enclave_measurement

    config = EnclaveConfig.load(Path(args.config))
    if config.attester == "simulated":
        m = enclave_measurement(config.measured())
    else:  # the platform measures the image: ask it, from inside the confidential VM or enclave
        from enclave_worker.attester import make_attester

        attester = make_attester(config)
        attester.close()
        m = attester.measurement
    if args.json:
        emit({"measurement": m})
    else:
        print(m)
    return EXIT_OK


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.servicer import serve

    serve(CoordinatorConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_serve(args: argparse.Namespace) -> int:
    from connectors.agent import PartyConfig, serve

    serve(PartyConfig.load(Path(args.config)), port_file=args.port_file)
    return EXIT_OK


def cmd_party_init(args: argparse.Namespace) -> int:
    from sealroom.keys import generate_signing_key, public_key_hex, save_signing_key

    key = generate_signing_key()
    save_signing_key(key, Path(args.key), overwrite=args.force)
    if args.json:
        emit({"key": str(args.key), "public_key": public_key_hex(key)})
    else:
        print(f"wrote {args.key} (mode 0600); public key {public_key_hex(key)}")
    return EXIT_OK


def cmd_dev_init(args: argparse.Namespace) -> int:
    from sealroom.attestation import dev_init

    root = dev_init(Path(args.dir), force=args.force)
    if args.json:
        emit({"simulated": True, "dev_root": str(root.cert_path), "key": str(root.key_path)})
        return EXIT_OK
    print(f"wrote the SIMULATED dev attestation root: {root.cert_path} (and its key {root.key_path})")
    print("relying parties pin the .crt with trust.dev_root and trust.allow_simulated = true")
    return EXIT_OK
