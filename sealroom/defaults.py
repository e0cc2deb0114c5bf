"""Defaults written once, for every room (stdlib only: a kernel module, loaded by the MPC player
process too, which must not load gRPC or the policy machinery)."""

from __future__ import annotations

DEFAULT_MIN_GROUP_SIZE = 5
"""The minimum group size (k) when a dataset's policy declares none: a released cell counts at least
this many distinct privacy units (or rows, without a privacy unit). An MPC stage spec without an
explicit k gets the same."""
