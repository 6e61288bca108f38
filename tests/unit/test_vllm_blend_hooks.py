"""The two places where CacheBlend meets vLLM outside the connector API, checked against the
installed vLLM so that a vLLM upgrade that breaks them fails here, loudly:

- the ``vllm.general_plugins`` entry point and the ``ModelRegistry`` overrides it installs
  (documented hooks; the subclasses must keep vLLM's constructor signature);
- ``salt_block_hashes``, which rewrites ``Request.block_hashes`` (not a documented API): vLLM must
  still chain each new block hash from ``block_hashes[-1]``, or the blocks of a blended request's
  generated tokens would be filed under ordinary hashes.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

BS = 16


def _request(req_id: str, tokens: list[int]):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(req_id, tokens, SamplingParams(max_tokens=8), None,
                   block_hasher=get_request_block_hasher(BS, sha256))


def test_vllm_version_is_one_the_salting_was_checked_on():
    import vllm
    from kvlayer.connectors.vllm.blend import SALT_CHECKED_VERSIONS

    assert vllm.__version__.startswith(SALT_CHECKED_VERSIONS), (
        f"vLLM {vllm.__version__}: re-check salt_block_hashes against its Request/block hashing, then add it")


def test_salted_hashes_differ_and_chain_into_generated_blocks():
    from kvlayer.connectors.vllm.blend import salt_block_hashes

    prompt = list(range(100, 100 + 4 * BS + 3))
    plain, blended = _request("a", prompt), _request("b", prompt)
    assert plain.block_hashes == blended.block_hashes and len(plain.block_hashes) == 4
    assert salt_block_hashes(blended, 1, b"salt") == 3
    assert blended.block_hashes[0] == plain.block_hashes[0]  # the exact prefix block keeps its hash
    assert all(a != b for a, b in zip(plain.block_hashes[1:], blended.block_hashes[1:], strict=True))
    assert type(blended.block_hashes[1]) is type(plain.block_hashes[1])
    for r in (plain, blended):  # fill the fifth block by decoding
        r.append_output_token_ids(list(range(BS - 3)))
    assert len(plain.block_hashes) == len(blended.block_hashes) == 5
    assert plain.block_hashes[4] != blended.block_hashes[4]  # chained from the salted parent


def test_entry_point_and_model_overrides():
    from kvlayer.connectors.vllm import models, plugin
    from vllm import ModelRegistry

    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "kvlayer"]
    assert eps and eps[0].value == "kvlayer.connectors.vllm.plugin:register", eps
    plugin.register()
    for arch in plugin.ARCHITECTURES:
        cls = ModelRegistry._try_load_model_cls(arch)
        assert cls is getattr(models, arch), arch
        base = cls.__mro__[1]
        assert base.__module__.startswith("vllm.model_executor.models."), base
        import inspect

        assert "vllm_config" in inspect.signature(cls.__init__).parameters  # vLLM's new-style check


def test_plugin_can_be_disabled(monkeypatch):
    from kvlayer.connectors.vllm import plugin

    monkeypatch.setenv("KVLAYER_VLLM_PLUGIN", "0")
    assert not plugin.enabled()
