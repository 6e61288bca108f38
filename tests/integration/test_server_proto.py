"""The checked-in gRPC code must be exactly what proto/generate.sh makes from proto/kvlayer.proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GEN = REPO / "kvlayer" / "rpc" / "_gen"
FILES = ("kvlayer_pb2.py", "kvlayer_pb2.pyi", "kvlayer_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(["bash", str(REPO / "proto" / "generate.sh"), str(tmp_path)], check=True, cwd=REPO,
                   capture_output=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    fresh = tmp_path / "kvlayer" / "rpc" / "_gen"
    stale = [f for f in FILES if (fresh / f).read_bytes() != (GEN / f).read_bytes()]
    assert not stale, f"kvlayer/rpc/_gen/{stale} differ from proto/kvlayer.proto: run proto/generate.sh and commit"


def test_proto_package_and_services() -> None:
    from kvlayer.rpc._gen import kvlayer_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["KVLayer"]
    assert pb.DESCRIPTOR.package == "kvlayer.v1"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in svc.methods}
    assert methods["Put"] == (True, False) and methods["Get"] == (False, True)
    for name in ("Lookup", "Exists", "Pin", "Unpin", "Evict", "Clear", "Stats", "Health"):
        assert methods[name] == (False, False), name


@pytest.mark.parametrize("key,total,data,durable", [("ab" * 32, 5 << 20, b"x" * 1000, True), ("", 0, b"\x00\xff" * 300, False),
                                                    ("cd" * 8, 1, b"", False), ("", 0, b"", False)])
def test_put_frame_fast_path_matches_generated_code(key, total, data, durable) -> None:
    from kvlayer.rpc import wire
    from kvlayer.rpc._gen import kvlayer_pb2 as pb

    msg = pb.PutFrame(key=key, total_len=total, data=data, durable=durable)
    assert wire.encode_put_frame(key, total, memoryview(data), durable) == msg.SerializeToString()
    v = wire.decode_put_frame(msg.SerializeToString())
    assert (v.key, v.total_len, bytes(v.data), v.durable) == (key, total, data, durable)


@pytest.mark.parametrize("index,found,total,data", [(0, False, 0, b""), (7, True, 3 << 20, b"abc" * 999), (300, True, 0, b"z")])
def test_get_frame_fast_path_matches_generated_code(index, found, total, data) -> None:
    from kvlayer.rpc import wire
    from kvlayer.rpc._gen import kvlayer_pb2 as pb

    msg = pb.GetFrame(index=index, found=found, total_len=total, data=data)
    assert wire.encode_get_frame(index, found, total, data) == msg.SerializeToString()
    v = wire.decode_get_frame(msg.SerializeToString())
    assert (v.index, v.found, v.total_len, bytes(v.data)) == (index, found, total, data)


def test_frame_parser_rejects_garbage_and_skips_unknown_fields() -> None:
    from kvlayer.rpc import wire

    for bad in (b"\x0a\x05ab", b"\x10", b"\x00\x01", b"\x0f", b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(ValueError):
            wire.decode_put_frame(bad)
    # unknown field 9 (varint) and 10 (fixed64) are skipped, as protobuf does
    v = wire.decode_get_frame(b"\x48\x05" + b"\x51" + b"\x00" * 8 + b"\x22\x02hi")
    assert bytes(v.data) == b"hi"
