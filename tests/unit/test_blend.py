"""CacheBlend: exactness at the ends of the ratio range, re-rotation, segment matching, the gate.

Small random models built in memory with fixed seeds (fp32, so "equal" means float tolerance);
real KVCache (memory tier) underneath. The CLI test runs the real `python -m kvlayer.blend` on
the shared tiny Llama fixture (with its real tokenizer).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvlayer import KVCache  # noqa: E402
from kvlayer.blend import (  # noqa: E402
    BlendConfig,
    Blender,
    CalibrationStore,
    DocumentIndex,
    Probe,
    Rope,
    Runner,
    calibrate,
    plan,
    rerotate,
)
from kvlayer.blend.pipeline import LayerwiseLoader  # noqa: E402
from kvlayer.blend.select import SelectionPolicy, Selector  # noqa: E402
from kvlayer.errors import UnsupportedModelError  # noqa: E402

VOCAB = 256
ATOL = 2e-5


def _llama(rope: dict | None = None, layers: int = 3, seed: int = 0, max_pos: int = 2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = {} if rope is None else {"rope_parameters": rope}
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      initializer_range=0.1, **kw)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      initializer_range=0.1)
    return Qwen2ForCausalLM(cfg).eval()


def _qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                      initializer_range=0.1)
    return Qwen3ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    return _llama()


def _docs(seed: int = 0, n: int = 3) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {f"d{i}": g.integers(0, VOCAB, size=int(g.integers(40, 70))) for i in range(n)}


def _blender(model, docs, chunk_size: int = 16, **cfg) -> Blender:
    runner = Runner(model)
    cache = KVCache(runner.kv_spec(), cpu_bytes="256MiB", chunk_size=chunk_size)
    b = Blender(model, cache, BlendConfig(gate=False, **cfg))
    for k, v in docs.items():
        b.add_document(k, v)
    return b


def _hf_kv(model, ids, **kw):
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids))[None], use_cache=True, **kw)
    layers = out.past_key_values.layers
    kv = torch.stack([torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)]) for lay in layers])
    return kv, out.logits[0]


# ---------------------------------------------------------------------------- runner


@pytest.mark.parametrize("make", [_llama, _qwen2, _qwen3], ids=["llama", "qwen2", "qwen3"])
def test_runner_full_prefill_matches_the_model_forward(make):
    model = make()
    ids = np.random.default_rng(1).integers(0, VOCAB, size=57)
    out = Runner(model).prefill(ids, logits_last=4)
    kv, logits = _hf_kv(model, ids)
    torch.testing.assert_close(out.kv, kv, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits[-4:], atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------- ends of the ratio range


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_ratio_one_equals_full_prefill_with_reordered_and_repeated_documents(make):
    model = make()
    docs = _docs()
    b = _blender(model, docs)
    g = np.random.default_rng(5)
    new = lambda k: g.integers(0, VOCAB, size=k)  # noqa: E731
    # new text, d2, d0 (reordered), new text, d2 again (repeated), the query
    ids = np.concatenate([new(5), docs["d2"], docs["d0"], new(3), docs["d2"], new(9)])
    full = b.full_prefill(ids, logits_last=3)
    res = b.blend(ids, logits_last=3, recompute_ratio=1.0)
    assert res.mode == "blend"
    assert [(s.kind, s.doc_id) for s in res.segments if s.kind == "doc"] == [("doc", "d2"), ("doc", "d0"), ("doc", "d2")]
    assert res.reused_tokens == res.recomputed_tokens == len(docs["d2"]) * 2 + len(docs["d0"])
    torch.testing.assert_close(res.kv, full.kv, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)
    # and a partial ratio is a real approximation, neither exact nor naive
    part = b.blend(ids, logits_last=3, recompute_ratio=0.3)
    naive = b.blend(ids, logits_last=3, recompute_ratio=0.0)
    assert 0 < part.recomputed_tokens < part.reused_tokens
    assert not torch.allclose(naive.logits, full.logits, atol=1e-3)


def test_ratio_zero_equals_concatenated_rerotated_document_kv(llama):
    docs = _docs(seed=2)
    b = _blender(llama, docs)
    query = np.random.default_rng(3).integers(0, VOCAB, size=7)
    order = ["d1", "d0", "d1", "d2"]
    ids = np.concatenate([*(docs[d] for d in order), query])
    res = b.blend(ids, logits_last=len(query), recompute_ratio=0.0)
    assert res.recomputed_tokens == 0
    # independent construction: each stored document KV, keys re-rotated to where it now sits
    rope = Rope(llama)
    parts, pos = [], 0
    for d in order:
        n, kv = b.cache.get_document(d)
        assert n == len(docs[d])
        cos_o, sin_o = rope.cos_sin(torch.arange(n))
        cos_n, sin_n = rope.cos_sin(torch.arange(pos, pos + n))
        k = torch.stack([rerotate(kv[li, 0], cos_o, sin_o, cos_n, sin_n) for li in range(kv.shape[0])])
        parts.append(torch.stack([k, kv[:, 1]], dim=1))
        pos += n
    concat = torch.cat(parts, dim=2)
    torch.testing.assert_close(res.kv[:, :, :pos], concat, atol=ATOL, rtol=1e-5)
    # the query attends over exactly that KV: the model's own forward with it as past_key_values
    from transformers import DynamicCache

    past = DynamicCache(config=llama.config)
    for li in range(concat.shape[0]):
        past.update(concat[li, 0].transpose(0, 1)[None].clone(), concat[li, 1].transpose(0, 1)[None].clone(), li)
    with torch.no_grad():
        out = llama(torch.as_tensor(query)[None], past_key_values=past,
                    position_ids=torch.arange(pos, pos + len(query))[None])
    torch.testing.assert_close(res.logits, out.logits[0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- re-rotation

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512},
}


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rerotation_equals_keys_recomputed_at_the_new_position(name):
    model = _llama(ROPES[name], layers=2)
    runner = Runner(model)
    doc = np.random.default_rng(4).integers(0, VOCAB, size=40)
    at0 = runner.prefill(doc).kv
    for p in (1, 333):
        # the model's own forward, the document alone but at positions p..p+n-1 (RoPE is
        # relative, so every layer's K equals the re-rotated K, and V is unchanged)
        kv_p, _ = _hf_kv(model, doc, position_ids=torch.arange(p, p + len(doc))[None])
        rope = runner.rope
        cos_o, sin_o = rope.cos_sin(torch.arange(len(doc)))
        cos_n, sin_n = rope.cos_sin(torch.arange(p, p + len(doc)))
        for li in range(at0.shape[0]):
            torch.testing.assert_close(rerotate(at0[li, 0], cos_o, sin_o, cos_n, sin_n), kv_p[li, 0], atol=1e-4,
                                       rtol=1e-4)
            torch.testing.assert_close(at0[li, 1], kv_p[li, 1], atol=1e-4, rtol=1e-4)


def test_rerotation_with_dynamic_ntk_beyond_the_original_length():
    # dynamic NTK changes the frequencies once the prompt outgrows max_position_embeddings, so the
    # cached keys (computed short) must be un-rotated with the old table and rotated with the new
    model = _llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, layers=2, max_pos=128)
    runner = Runner(model)
    doc = np.random.default_rng(6).integers(0, VOCAB, size=30)
    k0 = runner.prefill(doc).kv[0, 0]  # layer 0: K depends on the token and its position only
    prompt = np.concatenate([np.random.default_rng(7).integers(0, VOCAB, size=170), doc])
    kv_full, _ = _hf_kv(model, prompt)
    rope = runner.rope
    cos_o, sin_o = rope.cos_sin(torch.arange(len(doc)))
    cos_n, sin_n = rope.cos_sin(torch.arange(len(prompt)))
    got = rerotate(k0, cos_o, sin_o, cos_n[170:], sin_n[170:])
    torch.testing.assert_close(got, kv_full[0, 0, 170:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cos_o[:5], cos_n[:5])  # the table really changed


def test_rerotation_of_partial_rotary_dims():
    from transformers import Phi3Config, Phi3ForCausalLM
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     partial_rotary_factor=0.5, pad_token_id=0)
    model = Phi3ForCausalLM(cfg).eval()
    rope = Rope(model)
    assert rope.rotary_dim == 16  # half of head_dim 32
    k = torch.randn(1, 2, 20, 32)  # [batch, heads, tokens, dim]
    cos0, sin0 = rope.cos_sin(torch.arange(20))
    cosp, sinp = rope.cos_sin(torch.arange(500, 520))
    _, k_at0 = apply_rotary_pos_emb(k, k, cos0[None], sin0[None])
    _, k_atp = apply_rotary_pos_emb(k, k, cosp[None], sinp[None])
    got = rerotate(k_at0[0].transpose(0, 1), cos0, sin0, cosp, sinp)
    torch.testing.assert_close(got, k_atp[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[..., 16:], k[0].transpose(0, 1)[..., 16:])  # pass-through dims untouched
    with pytest.raises(UnsupportedModelError):  # the runner itself only runs Llama-family blocks
        Runner(model)


def test_model_without_rope_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedModelError, match="rotary"):
        Rope(model)
    with pytest.raises(UnsupportedModelError, match="rotary"):
        Runner(model)


# ---------------------------------------------------------------------------- segments


def test_documents_found_without_separators_in_any_order_repeated_and_cut():
    docs = _docs(seed=8, n=4)
    idx = DocumentIndex(n=8)
    for k, v in docs.items():
        idx.add(k, v)
    d0, d1, d2 = docs["d0"], docs["d1"], docs["d2"]
    # back to back (no separator), d1 twice, d0 cut at the start, d2 cut at the end
    prompt = np.concatenate([d0[17:], d1, d2[:30], d1, d2[:25]])
    segs = plan(prompt, index=idx, min_len=15)
    got = [(s.kind, s.start, s.end, s.doc_id, s.doc_start) for s in segs]
    a = len(d0) - 17
    b_ = a + len(d1)
    expect = [("doc", 0, a, "d0", 17), ("doc", a, b_, "d1", 0), ("doc", b_, b_ + 30, "d2", 0),
              ("doc", b_ + 30, b_ + 30 + len(d1), "d1", 0), ("doc", b_ + 30 + len(d1), len(prompt), "d2", 0)]
    assert got == expect
    for s in segs:  # never mis-aligned: every reused token is the document's token
        assert np.array_equal(prompt[s.start:s.end], docs[s.doc_id][s.doc_start:s.doc_start + s.length])


def test_overlapping_documents_take_the_longest_verified_match():
    g = np.random.default_rng(9)
    shared = g.integers(0, VOCAB, size=24)
    a = np.concatenate([shared, g.integers(0, VOCAB, size=30)])
    b = np.concatenate([shared, g.integers(0, VOCAB, size=40)])
    idx = DocumentIndex(n=8)
    idx.add("a", a)
    idx.add("b", b)
    prompt = np.concatenate([g.integers(0, VOCAB, size=5), b, g.integers(0, VOCAB, size=5)])
    segs = [s for s in plan(prompt, index=idx) if s.kind == "doc"]
    assert [(s.doc_id, s.start, s.length) for s in segs] == [("b", 5, len(b))]
    idx.remove("b")
    segs = [s for s in plan(prompt, index=idx) if s.kind == "doc"]
    assert [(s.doc_id, s.start, s.length) for s in segs] == [("a", 5, 24)]  # only the shared part matches a


def test_explicit_spans_are_verified_token_by_token():
    docs = _docs(seed=10)
    prompt = np.concatenate([docs["d0"], docs["d1"]]).copy()
    prompt[len(docs["d0"]) + 20] = (prompt[len(docs["d0"]) + 20] + 1) % VOCAB  # corrupt d1 at offset 20
    segs = plan(prompt, spans=[("d1", len(docs["d0"])), ("d0", 0)], docs=docs)
    assert [(s.kind, s.doc_id, s.start, s.length) for s in segs] == [
        ("doc", "d0", 0, len(docs["d0"])), ("doc", "d1", len(docs["d0"]), 20),
        ("new", None, len(docs["d0"]) + 20, len(docs["d1"]) - 20)]
    with pytest.raises(KeyError):
        plan(prompt, spans=[("nope", 0)], docs=docs)


def test_blend_with_explicit_spans_and_separator_free_prompt(llama):
    docs = _docs(seed=11)
    b = _blender(llama, docs)
    q = np.random.default_rng(12).integers(0, VOCAB, size=6)
    ids = np.concatenate([docs["d2"], docs["d1"], q])
    found = b.blend(ids, logits_last=2, recompute_ratio=0.2)
    given = b.blend(ids, logits_last=2, recompute_ratio=0.2, spans=[("d2", 0), ("d1", len(docs["d2"]))])
    # d2 at 0 is the cached prefix (exact) when found; both ways reuse every document token
    assert found.prefix_tokens + found.reused_tokens == len(docs["d2"]) + len(docs["d1"])
    assert given.reused_tokens + given.prefix_tokens == len(docs["d2"]) + len(docs["d1"])
    torch.testing.assert_close(found.logits, given.logits, atol=ATOL, rtol=1e-5)


def test_cached_prefix_is_exact_and_evicted_document_chunks_are_recomputed(llama):
    docs = _docs(seed=13)
    b = _blender(llama, docs)
    q = np.random.default_rng(14).integers(0, VOCAB, size=5)
    ids = np.concatenate([docs["d0"], docs["d1"], q])
    full = b.full_prefill(ids)
    res = b.blend(ids, recompute_ratio=1.0)
    assert res.prefix_tokens == (len(docs["d0"]) // 16) * 16  # whole chunks of d0 through chained keys
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)
    # drop d1's last chunk: its tail is no longer cached and must be computed, not misplaced
    doc = b.cache.document("d1")
    assert b.cache.evict(keys=doc.keys[-1:]) == 1
    res = b.blend(ids, recompute_ratio=1.0)
    assert res.reused_tokens == 16 * (len(docs["d1"]) // 16 if len(docs["d1"]) % 16 else len(docs["d1"]) // 16 - 1)
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------- selection, pipeline


def test_selector_budgets_and_gradual_narrowing():
    sel = Selector(SelectionPolicy(recompute_ratio=0.1, check_layer=1, narrow_layers=2, narrow_start=3.0), 100)
    assert [sel.budget(li) for li in (1, 2, 3)] == [30, 20, 10]
    assert not sel.active(0) and sel.active(3) and not sel.active(4)
    dev = torch.arange(30, dtype=torch.float32)
    assert sel.select(2, dev).tolist() == list(range(10, 30))
    with pytest.raises(ValueError):
        SelectionPolicy(recompute_ratio=1.5)


def test_selection_picks_the_most_deviating_tokens(llama):
    """With narrowing on, ratio 1.0 still equals full prefill; a partial ratio recomputes
    exactly the budget."""
    docs = _docs(seed=15)
    b = _blender(llama, docs, narrow_layers=1, narrow_start=2.0)
    ids = np.concatenate([docs["d1"], docs["d0"], np.arange(6)])
    full = b.full_prefill(ids)
    res = b.blend(ids, recompute_ratio=1.0)
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)
    res = b.blend(ids, recompute_ratio=0.25)
    assert res.recomputed_tokens == int(np.ceil(0.25 * res.reused_tokens))


def test_pipelined_loading_gives_the_same_result_as_sequential(llama):
    docs = _docs(seed=16)
    b = _blender(llama, docs)
    ids = np.concatenate([np.arange(4), docs["d2"], docs["d0"], np.arange(7)])
    b.config.pipeline = True
    a = b.blend(ids, recompute_ratio=0.2)
    b.config.pipeline = False
    s = b.blend(ids, recompute_ratio=0.2)
    assert torch.equal(a.kv, s.kv) and torch.equal(a.logits, s.logits)
    assert a.load.fetched_tokens == {"d2": len(docs["d2"]), "d0": len(docs["d0"])}


def test_loader_surfaces_fetch_errors():
    def boom(_: str):
        raise OSError("tier down")

    from kvlayer.blend.pipeline import Placement

    t = torch.zeros(10, 4)
    ld = LayerwiseLoader(boom, [Placement("x", 0, 5, 0, True)], num_tokens=10, num_layers=2, kv_heads=1,
                         head_dim=8, dtype=torch.float32, cos_new=t, sin_new=t, cos_old=t, sin_old=t).start()
    with pytest.raises(OSError, match="tier down"):
        ld.layer(0)
    ld.join()


# ---------------------------------------------------------------------------- the quality gate


def test_gate_refuses_uncalibrated_and_failed_models_and_allows_calibrated(llama, tmp_path, caplog):
    docs = _docs(seed=17)
    store = CalibrationStore(tmp_path / "calib.json")
    runner = Runner(llama)
    cache = KVCache(runner.kv_spec(), cpu_bytes="64MiB", chunk_size=16)
    b = Blender(llama, cache, BlendConfig(), calibration=store)  # gate on (the default)
    for k, v in docs.items():
        b.add_document(k, v)
    ids = np.concatenate([np.arange(3), docs["d1"], docs["d0"], np.arange(5)])
    full = b.full_prefill(ids)
    with caplog.at_level("WARNING", logger="kvlayer.blend"):
        res = b.blend(ids)
    assert res.mode == "full" and "never calibrated" in res.reason
    assert "blending refused" in caplog.text
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)

    probes = [Probe([list(docs["d0"]), list(docs["d2"])], list(range(8))),
              Probe([list(docs["d1"]), list(docs["d0"])], list(range(10, 16)))]
    rec = calibrate(llama, probes, ratios=(0.25, 1.0), threshold=-1.0, store=store)  # nothing can pass
    assert rec["status"] == "failed" and rec["fingerprint"] == runner.fingerprint
    res = b.blend(ids)
    assert res.mode == "full" and "failed" in res.reason

    rec = calibrate(llama, probes, ratios=(0.1, 0.25, 1.0), threshold=1e-6, store=store)
    assert rec["status"] == "ok" and rec["ratio"] == 1.0 and rec["errors"]["1"] <= 1e-6
    assert rec["errors"]["0"] > rec["errors"]["0.1"] > rec["errors"]["0.25"] > 1e-6
    on_disk = json.loads((tmp_path / "calib.json").read_text())
    assert on_disk[runner.fingerprint]["ratio"] == 1.0
    res = b.blend(ids, recompute_ratio=0.1)  # raised to the calibrated ratio
    assert res.mode == "blend" and res.recompute_ratio == 1.0
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)


def test_fingerprint_differs_between_checkpoints_and_is_stable():
    a, a2, b = _llama(seed=0, layers=1), _llama(seed=0, layers=1), _llama(seed=1, layers=1)
    assert Runner(a).fingerprint == Runner(a2).fingerprint != Runner(b).fingerprint


def test_cli_hooks_plug_into_a_parent_parser(tmp_path, capsys):
    import argparse

    from kvlayer.blend.cli import add_blend_arguments, run_blend

    store = CalibrationStore(tmp_path / "c.json")
    store.put("llama-abc", {"status": "ok", "ratio": 0.15, "threshold": 0.02})
    parser = argparse.ArgumentParser(prog="kvlayer")
    add_blend_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["blend", "show", "--calibration", str(tmp_path / "c.json")])
    assert args.command == "blend" and args.func is run_blend and run_blend(args) == 0
    assert json.loads(capsys.readouterr().out)["llama-abc"]["ratio"] == 0.15
    assert store.verdict("llama-abc") == (0.15, "calibrated")
    assert store.verdict("other")[0] is None


@pytest.mark.parametrize("mode", ["kv_attn", "attn", "v", "kv", "query", "kv_query"])
def test_selection_variants_keep_the_ends_of_the_ratio_range_exact(llama, mode):
    docs = _docs(seed=18)
    b = _blender(llama, docs, deviation=mode, check_layer=2, lead_tokens=3)
    ids = np.concatenate([np.arange(2), docs["d0"], docs["d2"], docs["d0"], np.arange(5)])
    full = b.full_prefill(ids, logits_last=2)
    res = b.blend(ids, logits_last=2, recompute_ratio=1.0)
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)
    assert b.blend(ids, logits_last=2, recompute_ratio=0.0).recomputed_tokens == 0


def test_lead_tokens_are_recomputed_first(llama):
    docs = _docs(seed=19)
    b = _blender(llama, docs, lead_tokens=4)
    ids = np.concatenate([np.arange(3), docs["d1"], docs["d2"], np.arange(4)])
    n_reused = len(docs["d1"]) + len(docs["d2"])
    ratio = 8 / n_reused  # budget = exactly the 2 x 4 leading tokens
    sel = Selector(SelectionPolicy(ratio, lead_tokens=4), n_reused)
    assert sel.final == 8
    res = b.blend(ids, recompute_ratio=ratio)
    assert res.recomputed_tokens == 8
    # which ones: run the runner directly to see the computed positions
    from kvlayer.blend.runner import Runner as R

    starts = [3, 3 + len(docs["d1"])]
    forced = torch.zeros(len(ids), dtype=torch.bool)
    for s in starts:
        forced[s:s + 4] = True
    full = b.full_prefill(ids)
    reused = np.zeros(len(ids), dtype=bool)
    reused[3:3 + n_reused] = True
    out = R(llama).run(ids, layer_kv=lambda li: (full.kv[li, 0], full.kv[li, 1]), reused=reused,
                       selector=Selector(SelectionPolicy(ratio, lead_tokens=4), n_reused, forced))
    picked = sorted(set(out.computed.tolist()) & set(np.flatnonzero(reused).tolist()))
    assert picked == [p for s in starts for p in range(s, s + 4)]


# ---------------------------------------------------------------------------- query-aware selection


def _probe_setup(llama, seed: int):
    docs = _docs(seed=seed)
    ids = np.concatenate([np.arange(3), docs["d1"], docs["d0"], np.arange(6)])
    reused = np.zeros(len(ids), dtype=bool)
    reused[3:3 + len(docs["d1"]) + len(docs["d0"])] = True
    stale = Runner(llama).prefill(np.arange(len(ids)) % VOCAB)  # some other KV: deviations are real
    return ids, reused, (lambda li: (stale.kv[li, 0], stale.kv[li, 1]))


def test_query_prior_is_the_questions_attention_and_drives_selection(llama):
    ids, reused, layer_kv = _probe_setup(llama, seed=21)
    r = Runner(llama)
    pos = torch.arange(len(ids))
    cos, sin = r.rope.cos_sin(pos)
    prior, kept = r._probe(torch.as_tensor(ids), pos, cos, sin, layer_kv, 0, torch.from_numpy(reused))
    assert prior is not None
    # every question token spreads one unit of attention per head and layer over the prompt
    torch.testing.assert_close(prior.sum(), torch.tensor(float(r.num_layers * r.num_heads * 6)), rtol=1e-4, atol=1e-3)
    # the loaded KV is kept for the real pass, with the new text's fresh K/V in place
    k0, _ = kept(1)
    torch.testing.assert_close(k0[reused], layer_kv(1)[0][reused])
    assert not torch.allclose(k0[~reused], layer_kv(1)[0][~reused])
    # "query" ranks reused tokens by that prior alone: the computed reused tokens are its top-k
    n_reused = int(reused.sum())
    sel = Selector(SelectionPolicy(0.2, deviation="query"), n_reused)
    out = r.run(ids, layer_kv=layer_kv, reused=reused, selector=sel)
    picked = sorted(set(out.computed.tolist()) & set(np.flatnonzero(reused).tolist()))
    cand = torch.from_numpy(np.flatnonzero(reused))
    top = sorted(cand[torch.topk(prior[cand], sel.final).indices].tolist())
    assert picked == top


# ---------------------------------------------------------------------------- document context


def test_document_context_is_keyed_and_positioned_exactly(llama):
    docs = _docs(seed=23, n=2)
    ctx = np.random.default_rng(24).integers(0, VOCAB, size=9)
    b = _blender(llama, {})
    plain = b.add_document("plain", docs["d0"])
    doc = b.add_document("ctx", docs["d0"], context=ctx)
    assert doc.context.tolist() == ctx.tolist()
    assert set(doc.keys).isdisjoint(plain.keys)  # different KV, different keys
    assert doc.keys == b.cache.document_keys(docs["d0"], context=ctx)  # deterministic
    n, kv = b.cache.get_document("ctx")
    assert n == len(docs["d0"])
    # stored KV = the KV of context + document, keys rotated from their real positions to 0..n-1
    ref = Runner(llama).prefill(np.concatenate([ctx, docs["d0"]])).kv[:, :, len(ctx):]
    rope = Rope(llama)
    cos_a, sin_a = rope.cos_sin(torch.arange(len(ctx), len(ctx) + n))
    cos_0, sin_0 = rope.cos_sin(torch.arange(n))
    k_back = torch.stack([rerotate(kv[li, 0], cos_0, sin_0, cos_a, sin_a) for li in range(kv.shape[0])])
    torch.testing.assert_close(k_back, ref[:, 0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(kv[:, 1], ref[:, 1])
    _, kv_plain = b.cache.get_document("plain")
    assert not torch.allclose(kv_plain[1:], kv[1:], atol=1e-3)  # layer 0 aside, context changes the KV


def test_blend_with_document_context_keeps_the_ends_exact(llama):
    docs = _docs(seed=25)
    ctx = np.arange(5)
    b = _blender(llama, {}, document_context=tuple(ctx.tolist()))
    for k, v in docs.items():
        b.add_document(k, v)
    assert all(d.context.tolist() == ctx.tolist() for d in b.cache.documents())
    ids = np.concatenate([ctx, docs["d2"], docs["d0"], docs["d1"], np.arange(6)])
    full = b.full_prefill(ids, logits_last=2)
    res = b.blend(ids, logits_last=2, recompute_ratio=1.0)
    torch.testing.assert_close(res.logits, full.logits, atol=ATOL, rtol=1e-5)
    naive = b.blend(ids, logits_last=2, recompute_ratio=0.0)
    assert naive.recomputed_tokens == 0 and naive.reused_tokens == sum(map(len, docs.values()))


def test_calibration_with_document_context_prompts_open_with_it(llama):
    docs = _docs(seed=26)
    probes = [Probe([list(docs["d0"]), list(docs["d1"])], list(range(8)))]
    rec = calibrate(llama, probes, ratios=(0.25, 1.0), threshold=1e-6, record=False, document_context=(5, 6, 7))
    assert tuple(rec["settings"]["document_context"]) == (5, 6, 7)
    assert rec["errors"]["1"] <= 1e-6 < rec["errors"]["0"]  # exact at 1.0, so the context lines up
    assert rec["status"] == "ok" and rec["ratio"] == 1.0


# ---------------------------------------------------------------------------- on a GPU (.ci/gpu)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu runs it)")
def test_runner_and_blend_run_on_the_gpu_like_on_the_cpu():
    """The reference runner on a CUDA model: prompts run on the GPU, cached KV (CPU tiers) is
    moved there, and the results match the CPU run; the weights fingerprint, hence every key,
    does not depend on the device."""
    import copy

    cpu = _llama(seed=4)
    gpu = copy.deepcopy(cpu).cuda()
    assert Runner(gpu).fingerprint == Runner(cpu).fingerprint
    docs = _docs(seed=30)
    ids = np.concatenate([np.arange(3), docs["d1"], docs["d0"], np.arange(5)])
    full_c, full_g = Runner(cpu).prefill(ids, logits_last=3), Runner(gpu).prefill(ids, logits_last=3)
    assert full_g.kv.is_cuda and full_g.logits.is_cuda
    torch.testing.assert_close(full_g.logits.cpu(), full_c.logits, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(full_g.kv.cpu(), full_c.kv, atol=1e-3, rtol=1e-3)
    bc, bg = _blender(cpu, docs, lead_tokens=2), _blender(gpu, docs, lead_tokens=2)
    rc, rg = bc.blend(ids, recompute_ratio=0.3), bg.blend(ids, recompute_ratio=0.3)
    assert rg.mode == rc.mode == "blend" and rg.kv.is_cuda
    assert rg.reused_tokens == rc.reused_tokens and rg.recomputed_tokens == rc.recomputed_tokens
    torch.testing.assert_close(rg.logits.cpu(), rc.logits, atol=1e-2, rtol=1e-2)
    exact = bg.blend(ids, recompute_ratio=1.0)  # recompute everything: the GPU's own full prefill
    torch.testing.assert_close(exact.logits, full_g.logits[-1:], atol=1e-4, rtol=1e-4)
