"""Sealroom: privacy-preserving joint analytics.

The ``sealroom`` package is the shared kernel (wire stubs, sealed stream, attestation, SQL analysis,
plans, errors, config) and the composition root (CLI, Python client, demo). Kernel modules import no
component package; the enclave worker loads only the kernel, so nothing heavy is imported here: the
analyst's names below are resolved lazily.

- ``sealroom.Client``: an analyst's connection to a coordinator (``sealroom.app.client``), and
  ``sealroom.QueryHandle`` and ``sealroom.Result`` (``sealroom.app.result``), what it hands back.
- ``sealroom.local_platform(scenario)``: a whole platform on this machine with synthetic data, for
  notebooks (``sealroom.app.local``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "LocalPlatform", "QueryHandle", "Result", "__version__", "local_platform"]

_LAZY = {
    "Client": "sealroom.app.client",
    "QueryHandle": "sealroom.app.client",
    "Result": "sealroom.app.result",
    "LocalPlatform": "sealroom.app.local",
    "local_platform": "sealroom.app.local",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    return getattr(importlib.import_module(module), name)
