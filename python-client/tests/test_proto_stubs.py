"""The committed gRPC stubs match what proto/ generates today."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[1]
COMMITTED = CLIENT / "cairn" / "_proto"
GENERATOR = CLIENT / "scripts" / "gen_proto.sh"


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        ["bash", str(GENERATOR), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(COMMITTED)
        for p in COMMITTED.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, COMMITTED / p, shallow=False)]
    assert not stale, (
        f"stubs out of date with proto/: {stale}; run python-client/scripts/gen_proto.sh"
    )


def test_installed_package_uses_the_stubs() -> None:
    from cairn._proto.cairn.v1 import cairn_pb2, cairn_pb2_grpc

    assert cairn_pb2.DESCRIPTOR.package == "cairn.v1"
    assert hasattr(cairn_pb2_grpc, "CheckpointStub") and hasattr(cairn_pb2_grpc, "AdminStub")
