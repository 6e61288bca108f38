"""The blend scheduler's decisions with vLLM's own Request objects and a real KVCache: which
requests it claims (every prompt token after vLLM's hit but the last), which it refuses and why,
and that a claimed request's block hashes are salted from the first block it writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from kvlayer.connectors.vllm.blend import BlendScheduler  # noqa: E402
from kvlayer.connectors.vllm.blend_config import BlendOptions  # noqa: E402

from kvlayer.blend.gate import CalibrationStore  # noqa: E402
from kvlayer.engine import KVCache  # noqa: E402
from kvlayer.spec import KVSpec  # noqa: E402

BS = 16
SPEC = KVSpec(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")


def _request(req_id: str, tokens: list[int], params: dict | None = None):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    sp = SamplingParams(max_tokens=4, extra_args={"kv_transfer_params": params} if params else None)
    return Request(req_id, tokens, sp, None, block_hasher=get_request_block_hasher(BS, sha256))


@pytest.fixture
def env(tmp_path):
    cache = KVCache(SPEC, cpu_bytes="16MiB", chunk_size=32)
    doc = list(range(1000, 1080))
    cache.put_document("d", doc, torch.randn(2, 2, len(doc), 2, 8))
    calib = CalibrationStore(tmp_path / "calib.json")
    yield cache, doc, calib
    cache.close()


def _sched(cache, calib, **opts):
    return BlendScheduler(cache, BlendOptions(enabled=True, **opts), block_size=BS, calibration=calib)


def test_claims_all_but_the_last_token_and_salts_from_the_first_written_block(env):
    cache, doc, calib = env
    s = _sched(cache, calib, gate=False)
    prompt = list(range(40)) + doc + list(range(50, 70))
    r = _request("r", prompt)
    plain = list(r.block_hashes)
    assert s.match(r, 16) == len(prompt) - 1 - 16
    assert s.owns(r)
    assert r.block_hashes[0] == plain[0] and all(a != b for a, b in zip(r.block_hashes[1:], plain[1:], strict=True))
    assert s.match(r, 16) == len(prompt) - 1 - 16  # asked again: same claim, hashes salted once
    assert s.counters.blend_requests == 1


def test_refusals_are_ordinary_requests(env):
    cache, doc, calib = env
    prompt = list(range(40)) + doc + list(range(50, 70))
    gated = _sched(cache, calib)  # gate on, no record
    assert gated.match(_request("a", prompt), 0) is None
    calib.put(cache.spec.model, {"status": "ok", "ratio": 0.2})
    assert gated.match(_request("b", prompt), 0) is not None
    s = _sched(cache, calib, gate=False)
    assert s.match(_request("c", prompt, {"kvlayer_blend": False}), 0) is None
    assert s.match(_request("d", list(range(200))), 0) is None  # no document inside
    assert s.match(_request("e", prompt, {"kvlayer_spans": [["nope", 3]]}), 0) is None
    cache.evict(keys=cache.document("d").keys[1:], force=True)  # partly evicted
    r = _request("f", prompt)
    plain = list(r.block_hashes)
    assert s.match(r, 0) is None and r.block_hashes == plain and not s.owns(r)
    assert s.counters.blend_refused == 3 and gated.counters.blend_refused == 1  # no document: not a refusal


def test_registration_request_is_recorded_not_claimed(env):
    cache, doc, calib = env
    s = _sched(cache, calib, gate=False)
    r = _request("g", list(range(30)) + doc, {"kvlayer_document": {"id": "new", "context_tokens": 30}})
    assert s.match(r, 0) is None and s.num_requests() == 1
    bad = _request("h", doc, {"kvlayer_document": {"id": "x", "context_tokens": len(doc)}})
    assert s.match(bad, 0) is None and s.num_requests() == 1  # context covering the prompt: refused
    assert np.array_equal(cache.document("d").tokens, doc)


def test_a_waiting_request_is_refused_once_and_forgotten_when_it_finishes(env):
    cache, doc, calib = env
    s = _sched(cache, calib, gate=False)
    r = _request("w", list(range(40)) + doc + list(range(50, 70)), {"kvlayer_blend": False})
    for _ in range(5):  # vLLM asks each step while the request waits for blocks
        assert s.match(r, 0) is None
    assert s.counters.blend_refused == 1 and s.num_requests() == 1
    s.finished(r)
    assert s.num_requests() == 0
