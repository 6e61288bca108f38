"""The checked-in gRPC code must be exactly what scripts/gen_proto.sh makes from proto/kvlayer.proto."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GEN = REPO / "kvlayer" / "server" / "_gen"
FILES = ("kvlayer_pb2.py", "kvlayer_pb2.pyi", "kvlayer_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, cwd=REPO,
                   capture_output=True, timeout=120)
    fresh = tmp_path / "kvlayer" / "server" / "_gen"
    stale = [f for f in FILES if (fresh / f).read_bytes() != (GEN / f).read_bytes()]
    assert not stale, f"kvlayer/server/_gen/{stale} differ from proto/kvlayer.proto: run scripts/gen_proto.sh and commit"


def test_proto_package_and_services() -> None:
    from kvlayer.server._gen import kvlayer_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["KVLayer"]
    assert pb.DESCRIPTOR.package == "kvlayer.v1"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert methods["Put"] == (True, False) and methods["Get"] == (False, True)
    for name in ("Lookup", "Exists", "Pin", "Unpin", "Evict", "Clear", "Stats", "Health"):
        assert methods[name] == (False, False), name
