"""``kvlayer.connectors.core``: what every engine adapter shares (option split, spec, failure
guard, counters, layout errors). No engine is imported; the one vLLM check skips without vLLM."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pytest
import torch
from kvlayer.connectors.core import (
    AdapterOptions,
    Counters,
    FailureGuard,
    LayoutError,
    engine_spec,
    rope_theta_of,
    split_extra_config,
    with_model_rope,
)

from kvlayer.errors import ConfigError, KVLayerError
from kvlayer.spec import model_fingerprint


class Opts(AdapterOptions):
    flag: bool = False
    limit: int = 3


# ------------------------------------------------------------------ option split
def test_split_takes_engine_keys_out_options_apart_and_the_rest_as_kvlayer_settings(tmp_path):
    f = tmp_path / "kv.yaml"
    f.write_text("chunk_size: 512\ncpu_bytes: 1GiB\ndisk_bytes: 1GiB\n")
    extra = {"backend_name": "x", "interface_v1": 1, "config_file": str(f), "cpu_bytes": "2GiB", "flag": True,
             "model_fingerprint": "m@1"}
    cfg, opts = split_extra_config(extra, Opts, engine_keys={"backend_name", "interface_v1"},
                                   env={"KVLAYER_CHUNK_SIZE": "384", "KVLAYER_DISK_BYTES": "3GiB"})
    # file < env < extra
    assert cfg.chunk_size == 384 and cfg.cpu_bytes == 2 << 30 and cfg.disk_bytes == 3 << 30
    assert opts == Opts(flag=True, limit=3, model_fingerprint="m@1")
    assert extra["flag"] is True  # the caller's mapping is not consumed


def test_a_typo_in_a_kvlayer_setting_names_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match="chunk_sise") as e:
        split_extra_config({"chunk_sise": 256}, Opts, env={})
    assert "chunk_size" in str(e.value)


def test_a_bad_option_value_is_a_config_error_naming_the_option():
    with pytest.raises(ConfigError, match="limit"):
        split_extra_config({"limit": "many"}, Opts, env={})
    _, opts = split_extra_config({}, Opts, env={})
    with pytest.raises(Exception, match="frozen"):
        opts.limit = 4  # type: ignore[misc]


# ------------------------------------------------------------------ spec
def test_engine_spec_fingerprint_is_the_specs_and_an_override_wins():
    s = engine_spec(model="org/m", revision="r1", dtype=torch.bfloat16, num_layers=4, num_kv_heads=2, head_dim=64,
                    tp_rank=1, tp_size=2)
    assert s.model == model_fingerprint("org/m", "r1", "bfloat16") and s.dtype == "bfloat16"
    assert (s.tp_rank, s.tp_size, s.num_layers) == (1, 2, 4)
    same = engine_spec(model="org/m", revision="r1", dtype="bfloat16", num_layers=4, num_kv_heads=2, head_dim=64,
                       tp_rank=1, tp_size=2)
    assert same.namespace() == s.namespace()  # torch dtype or its name: one namespace
    forced = engine_spec(model="org/m", revision="r1", dtype=torch.bfloat16, num_layers=4, num_kv_heads=2,
                         head_dim=64, fingerprint="mine")
    assert forced.model == "mine"
    other = engine_spec(model="org/m", revision="r2", dtype=torch.bfloat16, num_layers=4, num_kv_heads=2, head_dim=64,
                        tp_rank=1, tp_size=2)
    assert other.namespace() != s.namespace()


def test_model_fingerprint_is_deterministic(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    a = model_fingerprint(str(tmp_path), None, "bfloat16")
    assert a == model_fingerprint(str(tmp_path), None, "bfloat16")
    assert a != model_fingerprint(str(tmp_path), None, "float16")
    (tmp_path / "config.json").write_text('{"a": 2}')
    assert a != model_fingerprint(str(tmp_path), None, "bfloat16")
    assert model_fingerprint("org/model", "v1", "bfloat16") != model_fingerprint("org/model", "v2", "bfloat16")


def test_rope_base_comes_from_rotate_half_models_only():
    """The int codecs' key transform undoes rotate-half RoPE over the whole head: a model whose
    config says so gives its base; interleaved or partial RoPE gives nothing (keys as stored)."""
    from transformers import GPTJConfig, LlamaConfig, Qwen2Config

    from kvlayer.config import load_config

    llama = LlamaConfig(rope_theta=500000.0)
    assert rope_theta_of(llama) == 500000.0
    assert rope_theta_of(Qwen2Config(rope_theta=1e6)) == 1e6
    assert rope_theta_of(GPTJConfig()) is None  # interleaved pairs
    partial = LlamaConfig(rope_theta=1e4)
    partial.partial_rotary_factor = 0.5
    assert rope_theta_of(partial) is None
    assert rope_theta_of(None) is None
    cfg = load_config(env={})
    assert with_model_rope(cfg, llama).rope_theta == 500000.0 and cfg.rope_theta is None
    mine = load_config(env={"KVLAYER_ROPE_THETA": "10000"})
    assert with_model_rope(mine, llama).rope_theta == 10000.0  # the user's setting wins
    off = load_config(env={"KVLAYER_ROPE_THETA": "0"})  # 0: keys as stored, nothing filled in
    assert with_model_rope(off, llama).rope_theta == 0
    with pytest.raises(ConfigError, match="rope_theta"):
        load_config(env={"KVLAYER_ROPE_THETA": "-1"})


# ------------------------------------------------------------------ failure guard
def _boom() -> int:
    raise OSError("tier down")


def test_guard_returns_the_default_counts_and_logs_once_per_burst(caplog):
    log = logging.getLogger("kvlayer.test.guard")
    g = FailureGuard(log, "test engine", quiet_s=3600)
    with caplog.at_level(logging.DEBUG, logger=log.name):
        assert g.call("load", lambda: 7, -1) == 7
        assert [g.call("load", _boom, -1, then="recomputed") for _ in range(3)] == [-1, -1, -1]
        assert g.call("save", _boom, None) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["kvlayer test engine: load failed (OSError: tier down); recomputed",
                        "kvlayer test engine: save failed (OSError: tier down); ignored"]
    assert g.errors() == {"load": 3, "save": 1} and g.total == 4
    caplog.clear()
    g.quiet_s = 0.0  # the burst is over: the next failure is reported with what was silenced
    with caplog.at_level(logging.WARNING, logger=log.name):
        g.call("load", _boom, -1, then="recomputed")
    assert [r.getMessage() for r in caplog.records] == [
        "kvlayer test engine: load failed (OSError: tier down); recomputed (2 more since the last report)"]


def test_guard_runs_cleanup_and_survives_a_failing_cleanup():
    g = FailureGuard(logging.getLogger("kvlayer.test.guard"), "t")
    undone: list[str] = []
    assert g.call("load", _boom, 0, on_error=lambda e: undone.append(str(e))) == 0
    assert undone == ["tier down"]

    def bad_cleanup(_e: Exception) -> None:
        raise RuntimeError("cleanup broke")

    assert g.call("save", _boom, 0, on_error=bad_cleanup) == 0
    assert g.errors() == {"load": 1, "save": 1, "save cleanup": 1}


def test_guard_does_not_swallow_interrupts():
    g = FailureGuard(logging.getLogger("kvlayer.test.guard"), "t")

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        g.call("load", interrupted, None)
    assert g.total == 0


# ------------------------------------------------------------------ counters
@dataclass
class Two(Counters):
    a: int = 0
    b: int = 0


def test_counters_add_exactly_from_many_threads_and_refuse_unknown_names():
    c = Two()

    def work() -> None:
        for _ in range(2000):
            c.add(a=1, b=2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.as_dict() == {"a": 8000, "b": 16000}
    with pytest.raises(AttributeError):
        c.add(c=1)
    c.reset()
    assert c.as_dict() == {"a": 0, "b": 0}
    assert Two().as_dict() == {"a": 0, "b": 0}  # instances do not share counts


# ------------------------------------------------------------------ layout errors
def test_layout_errors_of_every_adapter_are_kvlayer_errors():
    from kvlayer.connectors.sglang.layout import PageIndexError, UnsupportedPoolError

    assert issubclass(LayoutError, KVLayerError)
    assert issubclass(UnsupportedPoolError, LayoutError) and issubclass(UnsupportedPoolError, ValueError)
    assert issubclass(PageIndexError, KVLayerError)
    pytest.importorskip("vllm")
    from kvlayer.connectors.vllm.layout import LayoutError as VLLMLayoutError

    assert VLLMLayoutError is LayoutError
