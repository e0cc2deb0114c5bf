"""Sealroom: privacy-preserving joint analytics.

The ``sealroom`` package is the shared kernel (wire stubs, sealed stream, attestation, SQL analysis,
plans, errors, config) and the composition root (CLI, Python client, demo). Kernel modules import no
component package; the enclave worker loads only the kernel, so nothing heavy is imported here:
``sealroom.Client`` is resolved lazily.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from sealroom.client import Client

        return Client
    raise AttributeError(name)
