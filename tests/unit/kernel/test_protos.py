"""The committed stubs in sealroom/v1 match proto/ (one regeneration command: `make protos`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_committed_stubs_match_proto_sources():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_drift_check_fails_when_a_proto_changes(tmp_path):
    """The check must be able to fail: edit a copy of the sources and run it there."""
    work = tmp_path / "repo"
    for part in ("proto", "scripts", "sealroom/v1"):
        shutil.copytree(ROOT / part, work / part)
    proto = work / "proto/sealroom/v1/common.proto"
    proto.write_text(proto.read_text().replace("message Empty {}", "message Empty {\n  string added = 1;\n}"))
    proc = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=work, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "common_pb2" in proc.stderr and "make protos" in proc.stderr
