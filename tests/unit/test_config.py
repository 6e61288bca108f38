"""Config: file (YAML/TOML) < env KVLAYER_* < CLI < kwargs, sizes, and errors that name the field."""

from __future__ import annotations

import pytest

from kvlayer.config import KVLayerConfig, TierConfig, config_from_env, load_config, parse_size
from kvlayer.errors import ConfigError

YAML = """
kvlayer:
  chunk_size: 64
  salt: from-file
  cpu_bytes: 1GiB
  disk_path: /tmp/from-file
  disk_codec: raw
  write_policy: on_demotion
"""

TOML = """
chunk_size = 64
salt = "from-file"
cpu_bytes = "1GiB"
disk_path = "/tmp/from-file"
disk_codec = "raw"
write_policy = "on_demotion"
"""


@pytest.fixture(params=["yaml", "toml"])
def cfg_file(request, tmp_path):
    p = tmp_path / f"kvlayer.{request.param}"
    p.write_text(YAML if request.param == "yaml" else TOML)
    return p


def test_file_alone(cfg_file):
    c = load_config(cfg_file, env={})
    assert c.chunk_size == 64
    assert c.salt == "from-file"
    assert c.cpu_bytes == 1 << 30
    assert c.disk_path == "/tmp/from-file"
    assert c.write_policy == "on_demotion"
    assert [t.kind for t in c.tier_configs()] == ["memory", "disk"]


def test_precedence_file_env_cli_kwargs(cfg_file):
    env = {"KVLAYER_CHUNK_SIZE": "128", "KVLAYER_SALT": "from-env", "KVLAYER_CPU_BYTES": "2GiB",
           "KVLAYER_DISK_CODEC": "lz4", "UNRELATED": "x"}
    c = load_config(cfg_file, env=env)
    assert (c.chunk_size, c.salt, c.cpu_bytes, c.disk_codec) == (128, "from-env", 2 << 30, "lz4")
    assert c.disk_path == "/tmp/from-file"  # not overridden: still from the file

    cli = {"chunk_size": 32, "salt": "from-cli", "cpu_bytes": None}  # None = flag not given
    c = load_config(cfg_file, env=env, cli=cli)
    assert (c.chunk_size, c.salt, c.cpu_bytes) == (32, "from-cli", 2 << 30)

    c = load_config(cfg_file, env=env, cli=cli, salt="from-kwargs")
    assert (c.chunk_size, c.salt, c.write_policy) == (32, "from-kwargs", "on_demotion")


def test_env_names_the_config_file(cfg_file):
    c = load_config(env={"KVLAYER_CONFIG": str(cfg_file), "KVLAYER_SALT": "e"})
    assert c.chunk_size == 64 and c.salt == "e"


def test_env_coercion():
    env = {"KVLAYER_PROMOTE_ON_HIT": "false", "KVLAYER_REDIS_URL": "none", "KVLAYER_RETRY_AFTER_S": "0.5",
           "KVLAYER_TIERS": '[{"kind": "memory", "capacity": "1MiB"}]', "KVLAYER_EXT_CACHE": "/x"}
    d = config_from_env(env)
    assert "ext_cache" not in d  # KVLAYER_* variables that are not settings are ignored
    c = load_config(env=env)
    assert c.promote_on_hit is False and c.redis_url is None and c.retry_after_s == 0.5
    assert c.tier_configs()[0].capacity == 1 << 20


def test_tiers_take_the_top_level_retry_policy_unless_they_set_their_own():
    c = load_config(env={}, retry_after_s=1, retry_max_s=8, retry_multiplier=3,
                    tiers=[{"kind": "memory"}, {"kind": "disk", "path": "/d", "retry_after_s": 0.5},
                           {"kind": "disk", "name": "d2", "path": "/e", "retry_max_s": 60}])
    got = [(t.retry_after_s, t.retry_max_s, t.retry_multiplier) for t in c.tier_configs()]
    assert got == [(1, 8, 3), (0.5, None, 3), (1, 60, 3)]  # a tier's own window stays flat
    assert [t.retry_after_s for t in KVLayerConfig(retry_after_s=2, disk_path="/d").tier_configs()] == [2, 2]
    assert "retry_multiplier" in _err(retry_multiplier=0.5)


def _err(**kw) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(env={}, **kw)
    return str(ei.value)


def test_bad_codec_names_field_and_choices():
    msg = _err(cpu_codec="zstd")
    assert "cpu_codec" in msg and "zstd" in msg
    for accepted in ("raw", "int4", "fp8"):
        assert accepted in msg
    msg = _err(disk_codec="raw+zip")
    assert "disk_codec" in msg and "lz4" in msg


def test_bad_size_names_field_and_units():
    msg = _err(cpu_bytes="lots")
    assert "cpu_bytes" in msg and "'lots'" in msg and "GiB" in msg
    msg = _err(disk_bytes=-1)
    assert "disk_bytes" in msg and ">= 0" in msg
    msg = _err(write_queue_bytes="-5MiB")
    assert "write_queue_bytes" in msg


def test_unknown_field_lists_valid_settings():
    msg = _err(chunk_sise=128)
    assert "chunk_sise" in msg and "unknown setting" in msg and "chunk_size" in msg


def test_unknown_field_in_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('cpu_byte = "1GiB"\n')
    with pytest.raises(ConfigError, match="cpu_byte"):
        load_config(p, env={})


def test_negative_chunk_size_and_bad_literal():
    msg = _err(chunk_size=-4)
    assert "chunk_size" in msg and "greater than or equal to 1" in msg
    msg = _err(write_policy="sometimes")
    assert "write_policy" in msg and "write_through" in msg and "on_demotion" in msg


def test_env_errors_are_reported_too():
    with pytest.raises(ConfigError, match="chunk_size"):
        load_config(env={"KVLAYER_CHUNK_SIZE": "many"})


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("chunk_size = = 3")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config(bad, env={})
    ini = tmp_path / "c.ini"
    ini.write_text("x")
    with pytest.raises(ConfigError, match=".yaml"):
        load_config(ini, env={})
    lst = tmp_path / "l.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst, env={})


def test_tier_config_validation():
    with pytest.raises(ConfigError, match="needs a url"):
        load_config(env={}, tiers=[{"kind": "redis"}])
    with pytest.raises(ConfigError, match=r"tiers.0.kind: unknown tier kind 'tape'; choose from \['disk', 'memory'"):
        load_config(env={}, tiers=[{"kind": "tape"}])
    t = TierConfig(kind="disk", capacity="2MiB", codec="int8+lz4")
    assert t.name == "disk" and t.capacity == 2 << 20


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0), ("123", 123), (4096, 4096), (1.5e3, 1500),
        ("1KiB", 1024), ("1kb", 1000), ("2 MiB", 2 << 20), ("1.5GiB", 3 << 29), ("3G", 3 * 10**9),
        ("1TiB", 1 << 40), (" 7b ", 7), ("512MB", 512 * 10**6),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "GiB", "1.2.3MiB", "5 parsecs", "-1", True, -3])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_defaults_and_assignment_validation():
    c = KVLayerConfig()
    assert c.chunk_size == 256 and c.cpu_bytes == 4 << 30 and c.disk_path is None
    assert [t.name for t in c.tier_configs()] == ["cpu"]
    with pytest.raises(ValueError):
        c.chunk_size = 0  # validate_assignment
    assert KVLayerConfig(cpu_bytes=0, disk_path="/d").tier_configs()[0].kind == "disk"


def test_unknown_tier_field_lists_tier_settings():
    msg = _err(tiers=[{"kind": "memory", "capasity": "1MiB"}])
    assert "tiers.0.capasity" in msg and "capacity" in msg and "codec_params" in msg
    assert "chunk_size" not in msg  # the top-level settings are not what a tier accepts


def test_env_text_settings_are_not_coerced():
    env = {"KVLAYER_SALT": "yes", "KVLAYER_TENANT": "none", "KVLAYER_AUTH_TOKEN": "[abc]",
           "KVLAYER_DISK_PATH": "null", "KVLAYER_PROMOTE_ON_HIT": "0", "KVLAYER_LOG_LEVEL": "debug"}
    c = load_config(env=env)
    assert (c.salt, c.tenant, c.auth_token, c.log_level) == ("yes", "none", "[abc]", "DEBUG")
    assert c.disk_path is None and c.promote_on_hit is False


def test_log_level_is_checked_and_applied_to_kvlayers_loggers():
    import logging

    from kvlayer.connectors.core import apply_log_level

    msg = _err(log_level="on")
    assert "log_level" in msg and "DEBUG, INFO, WARNING, ERROR or CRITICAL" in msg
    logger = logging.getLogger("kvlayer")
    before = logger.level, list(logger.handlers)
    try:
        apply_log_level(KVLayerConfig(log_level="debug"))
        assert logging.getLogger("kvlayer.vllm").isEnabledFor(logging.DEBUG)
        apply_log_level(KVLayerConfig())  # the default keeps a level the program set itself
        assert logging.getLogger("kvlayer.vllm").isEnabledFor(logging.DEBUG)
        apply_log_level(load_config(env={"KVLAYER_LOG_LEVEL": "error"}))
        assert not logging.getLogger("kvlayer.vllm").isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before[0])
        logger.handlers[:] = before[1]


def test_env_json_settings_are_parsed():
    """Only text settings stay text: a dict[str, Any] setting still takes JSON from the env."""
    c = load_config(env={"KVLAYER_CODEC_PARAMS": '{"group_size": 64}', "KVLAYER_CPU_CODEC": "int4"})
    assert c.codec_params == {"group_size": 64}
    assert c.tier_configs()[0].codec_params == {"group_size": 64}
