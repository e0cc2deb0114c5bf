"""Regenerate the committed gRPC/protobuf stubs (with .pyi) from proto/sealroom/v1/*.proto.

Run: ``make protos`` (or ``python scripts/gen_protos.py``). ``--check`` regenerates into a temporary
directory and exits 1 when the committed files differ (CI and tests/unit/test_protos.py use it).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "sealroom" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    # protoc finds the mypy-protobuf plugins on PATH; they sit next to this interpreter.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "sealroom" / "v1").glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / "sealroom" / "v1").glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs drifted")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        if args.check:
            committed = sorted(OUT_DIR.glob("*_pb2*"))
            names = {p.name for p in produced}
            drift = sorted(names ^ {p.name for p in committed})
            drift += [
                p.name for p in produced if p.name not in drift and not filecmp.cmp(p, OUT_DIR / p.name, shallow=False)
            ]
            if drift:
                print("generated stubs differ from proto/ sources: " + ", ".join(drift), file=sys.stderr)
                print("run `make protos` and commit the result", file=sys.stderr)
                return 1
            print(f"{len(produced)} generated files match proto/ sources")
            return 0
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for old in OUT_DIR.glob("*_pb2*"):
            old.unlink()
        for p in produced:
            shutil.copy(p, OUT_DIR / p.name)
        print(f"wrote {len(produced)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
