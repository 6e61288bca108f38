"""One typed, validated configuration, assembled from (lowest to highest precedence):
a YAML/TOML/JSON file, ``KVLAYER_*`` environment variables, CLI flags, Python keyword arguments.

Sizes accept integers or strings such as ``"4GiB"``/``"512MB"``. Every validation error names the
field, the value and what is accepted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvlayer.assets import cache_dir
from kvlayer.errors import ConfigError
from kvlayer.units import parse_size


def default_cache_dir() -> Path:
    """kvlayer's one user cache dir (``$KVLAYER_CACHE_DIR``, else the XDG one): see ``kvlayer.assets``."""
    return cache_dir()


@dataclass(frozen=True)
class TierKind:
    """Where a tier kind lives: ``module`` defines ``Options`` (a ``kvlayer.storage.base.TierOptions``
    model of its ``options``) and ``build(cfg, options) -> Tier``; it is imported only when such a
    tier is built. ``extra``: the pip extra its client library comes with."""

    module: str
    needs_url: bool = False
    extra: str | None = None


#: The tier registry: adding a tier kind is its module plus one line here.
TIER_KINDS: dict[str, TierKind] = {
    "memory": TierKind("kvlayer.storage.memory"),
    "disk": TierKind("kvlayer.storage.disk"),
    "redis": TierKind("kvlayer.storage.redis", needs_url=True, extra="redis"),
    "remote": TierKind("kvlayer.storage.remote", needs_url=True, extra="server"),
}


class TierConfig(BaseModel):
    """One storage level. ``options`` carries kind-specific settings (timeouts, TLS, ...), checked
    against the kind's options model when the tier is built. ``retry_*`` left unset take the
    top-level values (``KVLayerConfig.tier_configs`` fills them in)."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    name: str = ""
    capacity: int = Field(default=0, description="byte budget; 0 = unlimited (remote tiers)")
    codec: str = "raw"
    codec_params: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    url: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    retry_after_s: float | None = Field(default=None, ge=0, description="how long this tier is skipped after a failure")
    retry_max_s: float | None = Field(default=None, ge=0, description="the longest skip after failures in a row")
    retry_multiplier: float | None = Field(default=None, ge=1, description="skip growth per failure in a row")

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in TIER_KINDS:
            raise ValueError(f"unknown tier kind {v!r}; choose from {sorted(TIER_KINDS)}")
        return v

    @field_validator("capacity", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from kvlayer.codec import Codec

        Codec(v)  # raises ConfigError naming the accepted codecs
        return v

    @model_validator(mode="after")
    def _check(self) -> TierConfig:
        if not self.name:
            self.name = self.kind
        if TIER_KINDS[self.kind].needs_url and not self.url:
            raise ValueError(f"tier {self.name!r} of kind {self.kind!r} needs a url")
        return self


class KVLayerConfig(BaseModel):
    """Everything kvlayer can be told. The flat fields build the default tier list; an explicit
    ``tiers`` list replaces it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    chunk_size: int = Field(default=256, ge=1, le=1 << 20)
    salt: str = ""
    cpu_bytes: int = Field(default=4 << 30, description="CPU tier budget; 0 disables it")
    cpu_codec: str = "raw"
    disk_path: str | None = Field(default=None, description="disk tier directory; None = no disk tier")
    disk_bytes: int = 16 << 30
    disk_codec: str = "lz4"
    redis_url: str | None = None
    redis_codec: str = "lz4"
    server_url: str | None = None
    server_codec: str = "raw"
    auth_token: str | None = None
    tenant: str = "default"
    codec_params: dict[str, Any] = Field(default_factory=dict)
    rope_theta: float | None = Field(default=None, ge=0, description="the model's RoPE base; None = the vLLM and "
                                     "SGLang connectors fill it in from the model's config. The rotated int codecs "
                                     "then quantize keys with RoPE undone within each chunk (docs/codecs.md); 0 = "
                                     "keys as stored")
    write_policy: Literal["write_through", "on_demotion"] = "write_through"
    write_queue_bytes: int = Field(default=256 << 20, description="bound on bytes queued for lower tiers")
    promote_on_hit: bool = True
    malloc_tuning: bool = Field(default=False, description="process-wide glibc malloc settings for multi-MiB "
                                "blobs (kvlayer.malloc): fewer page faults, up to 256 MiB freed heap kept")
    retry_after_s: float = Field(default=5.0, ge=0, description="how long a failing tier is skipped")
    retry_max_s: float | None = Field(default=None, ge=0, description="the longest skip after failures in a "
                                      "row (each multiplies it by retry_multiplier); None = retry_after_s, flat")
    retry_multiplier: float = Field(default=2.0, ge=1)
    tiers: list[TierConfig] | None = None
    log_level: str = Field(default="WARNING", description="level of kvlayer's log lines (DEBUG shows each "
                           "lookup's claim or decline): DEBUG, INFO, WARNING, ERROR or CRITICAL")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = str(v).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"unknown log level {v!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("cpu_bytes", "disk_bytes", "write_queue_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _not_bool(cls, v: Any) -> Any:
        if isinstance(v, bool):  # pydantic's lax mode reads True as 1
            raise ValueError("must be a number of tokens, not a bool")
        return v

    @field_validator("cpu_codec", "disk_codec", "redis_codec", "server_codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from kvlayer.codec import Codec

        Codec(v)
        return v

    def tier_configs(self) -> list[TierConfig]:
        """The effective tier list, hot to cold."""
        if self.tiers is not None:
            return [self._with_retry(t) for t in self.tiers]
        out: list[TierConfig] = []
        cp = self.codec_params
        if self.cpu_bytes > 0:
            out.append(TierConfig(kind="memory", name="cpu", capacity=self.cpu_bytes, codec=self.cpu_codec, codec_params=cp))
        if self.disk_path:
            out.append(TierConfig(kind="disk", name="disk", capacity=self.disk_bytes, codec=self.disk_codec,
                                  path=self.disk_path, codec_params=cp))
        if self.server_url:
            out.append(TierConfig(kind="remote", name="remote", url=self.server_url, codec=self.server_codec,
                                  codec_params=cp, options={"auth_token": self.auth_token, "tenant": self.tenant}))
        if self.redis_url:
            out.append(TierConfig(kind="redis", name="redis", url=self.redis_url, codec=self.redis_codec, codec_params=cp))
        return [self._with_retry(t) for t in out]

    def _with_retry(self, tier: TierConfig) -> TierConfig:
        """``tier`` with its unset retry settings taken from the top level."""
        top = {"retry_after_s": self.retry_after_s, "retry_max_s": self.retry_max_s,
               "retry_multiplier": self.retry_multiplier}
        unset = {k: v for k, v in top.items() if getattr(tier, k) is None}
        if "retry_after_s" not in unset and "retry_max_s" in unset:
            unset["retry_max_s"] = None  # a tier's own window is flat unless it says otherwise
        return tier.model_copy(update=unset) if unset else tier


ENV_PREFIX = "KVLAYER_"


def _coerce_env(value: str) -> Any:
    v = value.strip()
    if v.lower() in ("true", "yes", "on"):
        return True
    if v.lower() in ("false", "no", "off"):
        return False
    if v.lower() in ("none", "null", ""):
        return None
    if v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    return v


def config_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``KVLAYER_CHUNK_SIZE=128`` -> ``{"chunk_size": "128"}`` (pydantic coerces types)."""
    env = os.environ if env is None else env
    fields = set(KVLayerConfig.model_fields)
    out: dict[str, Any] = {}
    for k, v in env.items():
        if not k.startswith(ENV_PREFIX) or k == "KVLAYER_CONFIG":
            continue
        name = k[len(ENV_PREFIX):].lower()
        if name in fields:
            out[name] = _coerce_env_for(KVLayerConfig.model_fields[name].annotation, v)
    return out


def _coerce_env_for(annotation: Any, value: str) -> Any:
    """Text settings stay text (KVLAYER_SALT=yes is the salt "yes", not True); optional text
    settings also accept none/null/empty for None. Everything else: see ``_coerce_env``."""
    if annotation is str:
        return value
    if str in get_args(annotation) and type(None) in get_args(annotation):
        return None if value.strip().lower() in ("none", "null", "") else value
    return _coerce_env(value)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(p)!r}: use a .yaml, .yml, .toml or .json file")
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {str(p)!r} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings")
    return data.get("kvlayer", data) if isinstance(data.get("kvlayer"), dict) else data


def _format_error(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            model = TierConfig if err["loc"][:1] == ("tiers",) else KVLayerConfig
            msg = f"unknown setting; valid settings: {', '.join(sorted(model.model_fields))}"
        lines.append(f"  {loc}: {msg} (got {err.get('input')!r})")
    return "invalid kvlayer config:\n" + "\n".join(lines)


def load_config(
    file: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> KVLayerConfig:
    """Merge file < env < cli < kwargs and validate. ``KVLAYER_CONFIG`` names a file when
    ``file`` is not given. Values of None in ``cli`` mean "flag not given"."""
    env = os.environ if env is None else env
    merged: dict[str, Any] = {}
    file = file or env.get("KVLAYER_CONFIG")
    if file:
        merged.update(read_config_file(file))
    merged.update(config_from_env(env))
    merged.update({k: v for k, v in (cli or {}).items() if v is not None})
    merged.update(kwargs)
    return make_config(merged)


def make_config(settings: Mapping[str, Any]) -> KVLayerConfig:
    """Validate ``settings``; any bad value is one ``ConfigError`` naming every bad setting."""
    try:
        return KVLayerConfig(**settings)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    except ConfigError as e:
        raise ConfigError(f"invalid kvlayer config: {e}") from None
