"""What every engine adapter needs, whatever the engine (``kvlayer.connectors.core``).

An adapter (``connectors/vllm/``, ``connectors/sglang/``, or a new one) does four things the same
way, so they live here once:

- ``split_extra_config``: the engine's free-form extra config holds the engine's own keys, the
  adapter's options and kvlayer settings; split them, validate each, and let a typo in a kvlayer
  setting fail with the list of valid names.
- ``engine_spec``: the KVSpec from what the engine knows about its model; the default fingerprint
  is ``kvlayer.spec.model_fingerprint`` for every engine, so one model served by two engines gets
  one namespace and shares chunks. ``with_model_rope``: the model's RoPE base into the config,
  for the codecs that quantize keys with RoPE undone.
- ``FailureGuard``: an engine call never raises because of kvlayer. A failure becomes the call's
  default answer (a miss, a dropped save), is counted per operation and logged once per burst.
- ``Counters``: named event counts an adapter reports through its own ``stats()``, never through
  module globals.

Adapters talk to the store only through ``kvlayer.engine.KVCache``. Nothing here imports an engine.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from kvlayer.config import KVLayerConfig, load_config
from kvlayer.errors import ConfigError, KVLayerError
from kvlayer.spec import KVSpec, dtype_name, model_fingerprint

T = TypeVar("T")
OptionsT = TypeVar("OptionsT", bound="AdapterOptions")

#: Key of the extra config that names a kvlayer config file (YAML, TOML or JSON).
CONFIG_FILE_KEY = "config_file"


class LayoutError(KVLayerError):
    """The engine keeps its KV in a layout this adapter cannot map to kvlayer's canonical chunk;
    the adapter refuses instead of reading or writing the wrong bytes."""


# ---------------------------------------------------------------------------------- options
class AdapterOptions(BaseModel):
    """Settings of an adapter itself (not of the store). Engines subclass it with their own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Overrides the fingerprint derived from the engine's model name/path, revision and KV dtype.
    model_fingerprint: str | None = None


def split_extra_config(extra: Mapping[str, Any] | None, options: type[OptionsT], *, engine_keys: Iterable[str] = (),
                       env: Mapping[str, str] | None = None) -> tuple[KVLayerConfig, OptionsT]:
    """Split an engine's extra config into (kvlayer config, adapter options).

    Keys in ``engine_keys`` belong to the engine and are dropped; fields of ``options`` are the
    adapter's; ``config_file`` names a kvlayer config file; everything else is a kvlayer setting.
    Precedence, lowest first: the config file (else ``KVLAYER_CONFIG``), ``KVLAYER_*`` variables,
    the extra config."""
    skip = frozenset(engine_keys)
    rest = {k: v for k, v in (extra or {}).items() if k not in skip}
    file = rest.pop(CONFIG_FILE_KEY, None)
    own = {k: rest.pop(k) for k in list(rest) if k in options.model_fields}
    try:
        opts = options(**own)
    except ValidationError as e:
        bad = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                        for err in e.errors())
        raise ConfigError(f"invalid kvlayer adapter option: {bad}") from None
    return load_config(file=file, env=env, cli=rest), opts


# ---------------------------------------------------------------------------------- spec
def engine_spec(*, model: str, revision: str | None, dtype: torch.dtype | str, num_layers: int, num_kv_heads: int,
                head_dim: int, tp_rank: int = 0, tp_size: int = 1, is_mla: bool = False,
                extra: Iterable[tuple[str, str]] = (), fingerprint: str | None = None) -> KVSpec:
    """KVSpec of one engine shard. ``fingerprint`` (an adapter option) overrides the one derived
    from ``model``, ``revision`` and the KV dtype."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    fp = fingerprint or model_fingerprint(model, revision, name)
    return KVSpec(model=fp, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=name,
                  tp_rank=tp_rank, tp_size=tp_size, is_mla=is_mla, extra=tuple(extra))


#: Model types whose every layer applies RoPE with one base in the rotate-half layout (pairs
#: ``j, j + D/2``), the one the int codecs' key transform undoes. Left out: interleaved pairs
#: (GPT-J, ChatGLM, Cohere), partial rotary dims (Phi-2, GPT-NeoX), layers without RoPE or with
#: another base (SmolLM3, Gemma 3, Llama 4): there the transform would fit nothing (still exact
#: to invert, only no gain).
ROTATE_HALF_MODELS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "phi3",
    "granite", "granitemoe", "olmo", "olmo2", "starcoder2", "internlm2", "deepseek", "exaone",
})


def rope_theta_of(hf_config: Any) -> float | None:
    """The RoPE base of a transformers model config when the model rotates its whole head in the
    rotate-half layout (``ROTATE_HALF_MODELS``), else None."""
    if getattr(hf_config, "model_type", None) not in ROTATE_HALF_MODELS:
        return None
    if float(getattr(hf_config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        return None
    params = getattr(hf_config, "rope_parameters", None)
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if theta is None:
        theta = getattr(hf_config, "rope_theta", None)
    try:
        value = float(theta)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if value > 0 and value == value and value != float("inf") else None


def with_model_rope(config: KVLayerConfig, hf_config: Any) -> KVLayerConfig:
    """``config`` with the model's RoPE base filled in, unless it names one (or none fits)."""
    if config.rope_theta is not None:
        return config
    theta = rope_theta_of(hf_config)
    return config if theta is None else config.model_copy(update={"rope_theta": theta})


# ---------------------------------------------------------------------------------- failures
def apply_log_level(config: KVLayerConfig) -> None:
    """kvlayer's lines at the configured level inside an engine process. Engines configure only
    their own loggers, so without a handler of ours Python would print WARNING and up alone,
    bare; none is added where the process's root logger already has one. The default level does
    not override a level the embedding program gave the ``kvlayer`` logger itself."""
    logger = logging.getLogger("kvlayer")
    if "log_level" in config.model_fields_set or logger.level == logging.NOTSET:
        logger.setLevel(config.log_level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        logger.addHandler(handler)


class FailureGuard:
    """Runs engine-facing work so that nothing raises into the engine.

    A failure returns the call's default, is counted per operation, and is logged once per burst:
    the first failure of an (operation, exception type) is a warning; repeats within ``quiet_s``
    are only counted, and the next warning after that says how many were not logged. A dead tier
    therefore costs misses, never a flooded log or a failed request."""

    def __init__(self, log: logging.Logger, what: str, *, quiet_s: float = 60.0) -> None:
        self.log = log
        self.what = what
        self.quiet_s = quiet_s
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {}
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last warning time, silenced since)

    def call(self, op: str, fn: Callable[[], T], default: T, *, then: str = "ignored",
             on_error: Callable[[Exception], object] | None = None, level: int = logging.WARNING) -> T:
        """``fn()``, or ``default`` if it raises; ``then`` says in the log what happens instead,
        ``on_error`` undoes partial work (its own failure is guarded too)."""
        try:
            return fn()
        except Exception as e:
            self.record(op, e, then=then, level=level)
            if on_error is not None:
                try:
                    on_error(e)
                except Exception as e2:
                    self.record(f"{op} cleanup", e2)
            return default

    def record(self, op: str, e: BaseException, *, then: str = "ignored", level: int = logging.WARNING) -> None:
        """Count a failure the caller handled itself, and log it once per burst."""
        key = (op, type(e).__name__)
        now = time.monotonic()
        with self._lock:
            self._errors[op] = self._errors.get(op, 0) + 1
            last, silenced = self._last.get(key, (float("-inf"), 0))
            loud = now - last >= self.quiet_s
            self._last[key] = (now, 0) if loud else (last, silenced + 1)
        if loud:
            more = f" ({silenced} more since the last report)" if silenced else ""
            self.log.log(level, "kvlayer %s: %s failed (%s: %s); %s%s", self.what, op, type(e).__name__, e, then, more,
                         exc_info=self.log.isEnabledFor(logging.DEBUG))
        else:
            self.log.debug("kvlayer %s: %s failed again (%s: %s)", self.what, op, type(e).__name__, e)

    def errors(self) -> dict[str, int]:
        """Failures per operation since start."""
        with self._lock:
            return dict(self._errors)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._errors.values())


# ---------------------------------------------------------------------------------- counters
@dataclass
class Counters:
    """Named event counts, safe to add to from several threads. Subclasses declare the names as
    ``int`` fields (a typo in ``add`` is then an AttributeError, not a new counter)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def reset(self) -> None:
        with self._lock:
            for f in fields(self):
                setattr(self, f.name, 0)
