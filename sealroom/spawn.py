"""How Sealroom starts its own Python processes (servers, MPC players).

A child started as ``python -m module`` puts its working directory first on ``sys.path``, so a stray
``typing.py`` (or any module name) there would be imported in place of the standard library's or
Sealroom's own, and could hang or subvert every server. :func:`python_command` starts children with
``-P`` (Python 3.11+: nothing is prepended to ``sys.path``); callers also give them a working
directory of Sealroom's own, not the user's.
"""

from __future__ import annotations

import sys


def python_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module`` with this interpreter, importing nothing from the
    working directory."""
    return [sys.executable, "-P", "-m", module, *args]
