"""The simulated enclave measurement: a hash of the enclave worker's code, libraries and config.

On a real TEE the hardware measures what it loads. With simulated attestation the worker measures
itself, so that a relying party's measurement allowlist still pins *which* code and configuration it
trusts (and a change to any of them changes the measurement). It is only as honest as the machine
computing it: a simulated measurement is a claim, not a proof.

What is hashed (SHA-384, every item length-framed so no two inputs collide by concatenation):

1. the version tag ``sealroom/v1/enclave-measurement``;
2. every ``*.py`` file of the installed ``enclave_worker``, ``sealroom`` and ``mpc`` packages (the
   worker computes MPC partials and runs ``python -m mpc.player`` for hybrid plans), by sorted
   relative POSIX path, path and contents; except ``sealroom``'s composition root (``sealroom/app/`` and
   the ``sealroom/cli.py`` entry point: user entry points the enclave never loads) and
   the generated ``sealroom/v1/*.pyi`` stubs (not code). A package that is not installed is skipped;
3. the installed versions of the libraries the worker and its MPC player load: grpcio, protobuf,
   pyarrow, duckdb, cryptography, sqlglot, mpyc, gmpy2, numpy (read from package metadata, without
   importing them);
4. canonical JSON of the worker's ``config`` (``None`` is the same as ``{}``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sealroom.canonical import canonical_json

__all__ = ["enclave_measurement", "MEASURED_PACKAGES", "MEASURED_DISTRIBUTIONS"]

_VERSION_TAG = b"sealroom/v1/enclave-measurement"
MEASURED_PACKAGES: tuple[str, ...] = ("enclave_worker", "sealroom", "mpc")
MEASURED_DISTRIBUTIONS: tuple[str, ...] = (
    "grpcio",
    "protobuf",
    "pyarrow",
    "duckdb",
    "cryptography",
    "sqlglot",
    "mpyc",
    "gmpy2",
    "numpy",  # MPyC (and pyarrow) load it
)
# Composition-root modules of `sealroom` (as a module `x.py` or, should one grow, a package `x/`).
_EXCLUDED_SEALROOM_MODULES = frozenset({"app", "cli"})


def _frame(data: bytes) -> bytes:
    return struct.pack(">Q", len(data)) + data


def _excluded(package: str, rel: str) -> bool:
    if package != "sealroom":
        return False
    if rel.startswith("v1/") and rel.endswith(".pyi"):
        return True
    head = rel.split("/", 1)[0]
    module = head[:-3] if head.endswith(".py") and "/" not in rel else head
    return module in _EXCLUDED_SEALROOM_MODULES


def _package_files(package: str) -> list[tuple[str, Path]]:
    """Sorted (relative posix path, file) of the package's measured ``*.py`` files; [] if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    found: dict[str, Path] = {}
    for location in spec.submodule_search_locations:
        root = Path(location)
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                path = Path(dirpath) / filename
                rel = path.relative_to(root).as_posix()
                if not _excluded(package, rel):
                    found.setdefault(rel, path)  # the first location wins, as it would on import
    return sorted(found.items())


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _plain(value: object) -> Any:
    """``value`` with mappings as dicts and sets as sorted lists, for the canonical encoder."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"config value of type {type(value).__name__} is not JSON-serialisable")


def enclave_measurement(config: Mapping[str, object] | None = None) -> str:
    """SHA-384 (lowercase hex) of the enclave worker's code, library versions and ``config``."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, not {type(config).__name__}")
    config_json = canonical_json(_plain(dict(config)), allow_nan=False)

    h = hashlib.sha384(_frame(_VERSION_TAG))
    for package in MEASURED_PACKAGES:
        for rel, path in _package_files(package):
            h.update(_frame(b"file"))
            h.update(_frame(f"{package}/{rel}".encode()))
            h.update(_frame(path.read_bytes()))
    for name in MEASURED_DISTRIBUTIONS:
        h.update(_frame(b"dist"))
        h.update(_frame(name.encode()))
        h.update(_frame(_distribution_version(name).encode()))
    h.update(_frame(b"config"))
    h.update(_frame(config_json))
    return h.hexdigest()
