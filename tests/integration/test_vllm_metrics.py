"""kvlayer in vLLM's own metrics (``vllm:kvlayer_*``), real vLLM CPU build, tiny model.

- In-process engine (single process, ``disable_log_stats=False``: vLLM's own Prometheus logger
  in this process): after cold, warm-from-CPU and warm-from-disk requests, every kvlayer series
  equals the connector's own counters (``connector_of(llm).stats()``), hit tokens split by the
  tier that held them.
- The OpenAI server (engine in its own process, as in production): its ``/metrics`` shows the
  kvlayer series with vLLM's labels after traffic; the hit tokens equal vLLM's own count of
  connector-provided tokens and the saved chunks the files of the disk tier.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.test_vllm import CHUNK, engine_env  # noqa: E402

pytestmark = pytest.mark.vllm

#: connector counter -> the series holding it (summed over tiers)
SAME = {"hit_tokens": "vllm:kvlayer_hit_tokens_total", "hit_requests": "vllm:kvlayer_hit_requests_total",
        "lookups": "vllm:kvlayer_lookups_total", "lookup_timeouts": "vllm:kvlayer_lookup_timeouts_total",
        "declined_hits": "vllm:kvlayer_declined_hits_total", "declined_tokens": "vllm:kvlayer_declined_tokens_total",
        "loaded_chunks": "vllm:kvlayer_loaded_chunks_total", "load_errors": "vllm:kvlayer_load_errors_total",
        "saved_chunks": "vllm:kvlayer_saved_chunks_total", "saved_bytes": "vllm:kvlayer_saved_bytes_total",
        "save_errors": "vllm:kvlayer_save_errors_total", "dropped_saves": "vllm:kvlayer_dropped_saves_total"}


def _prom_in_process() -> dict[str, dict[str, float]]:
    """``{sample name: {tier or "": value}}`` of the kvlayer series in this process's registry,
    plus the label names seen."""
    from prometheus_client import REGISTRY

    out: dict[str, dict[str, float]] = {}
    labels: set[str] = set()
    for fam in REGISTRY.collect():
        if not fam.name.startswith("vllm:kvlayer_"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created") or s.name.endswith("_bucket"):
                continue
            labels.update(s.labels)
            row = out.setdefault(s.name, {})
            row[s.labels.get("tier", "")] = row.get(s.labels.get("tier", ""), 0.0) + s.value
    out["_labels"] = {k: 1.0 for k in labels}
    return out


def scenario_metrics(args: dict[str, Any]) -> dict[str, Any]:
    from tests.integration.test_vllm import _connector, _engine, _gen, _kv_config, _levels, make_prompts

    P = make_prompts()
    llm = _engine(_kv_config(args["disk"]), disable_log_stats=False)
    conn = _connector(llm)
    cache = conn.cache
    prompt = P["long"]
    _gen(llm, [prompt])  # cold: saves
    conn.flush()
    _gen(llm, [prompt])  # warm from the CPU tier
    keys = cache.keys(prompt, full_only=True)
    # test only: drop the CPU copies so the next load reads the disk tier
    _levels(cache)[0].tier.delete_many(keys)
    _gen(llm, [prompt])  # warm from disk
    # Stats reach vLLM at the step after they happen (a background save lands between steps):
    # repeat the request (all of it stored already: nothing new is saved) until they have.
    rounds = 0
    while True:
        conn.flush()
        prom = _prom_in_process()
        counters = conn.stats()["connector"]
        if all(sum(prom.get(s, {}).values()) == counters[k] for k, s in SAME.items()) or rounds == 4:
            break
        _gen(llm, [prompt], reset=False)
        rounds += 1
    return {"prom": prom, "counters": counters, "bytes_per_token": cache.spec.bytes_per_token(), "rounds": rounds}


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("vllm")
    from tests.fixtures.tiny_model import tiny_model_dir
    from tests.integration.test_vllm import run_scenario

    tiny_model_dir()
    tmp = tmp_path_factory.mktemp("metrics")
    return run_scenario("metrics", tmp, script=Path(__file__), disk=str(tmp / "disk"))


def test_prometheus_series_equal_the_connector_counters(in_process) -> None:
    prom, c = in_process["prom"], in_process["counters"]
    for k, series in SAME.items():
        assert sum(prom.get(series, {}).values()) == c[k], (k, prom.get(series), c[k])
    assert sum(prom["vllm:kvlayer_loaded_bytes_total"].values()) == c["loaded_tokens"] * in_process["bytes_per_token"]
    hits = prom["vllm:kvlayer_hit_tokens_total"]
    assert hits.get("cpu", 0) > 0 and hits.get("disk", 0) > 0, hits  # one warm request from each tier
    assert c["hit_tokens"] > 0 and c["saved_chunks"] > 0 and c["saved_bytes"] > 0
    reads = prom["vllm:kvlayer_tier_reads_total"]  # what the worker's store served, per tier
    assert reads.get("cpu", 0) > 0 and reads.get("disk", 0) > 0 and sum(reads.values()) == c["loaded_chunks"], reads
    loads = prom["vllm:kvlayer_load_seconds_count"]
    assert loads.get("cpu", 0) > 0 and loads.get("disk", 0) > 0, loads
    assert sum(prom["vllm:kvlayer_save_seconds_count"].values()) > 0
    assert {"model_name", "engine", "tier"} <= set(prom["_labels"])


# ============================================================================ OpenAI server
@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Any, str, Path]]:
    pytest.importorskip("vllm")
    from kvlayer.testing import VLLMServer
    from tests.fixtures.tiny_model import tiny_model_dir

    model = tiny_model_dir()
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    extra = {"chunk_size": CHUNK, "cpu_bytes": "128MiB", "load_or_recompute": False, "disk_path": str(tmp_path / "disk")}
    with VLLMServer(model, tmp_path, extra=extra, args=("--max-model-len", "2048"), env=env) as srv:
        yield srv, model, tmp_path


def _series(text: str, name: str) -> dict[str, float]:
    """``{label text: value}`` of one series in Prometheus text format."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_openai_server_metrics_show_kvlayer_series(server) -> None:
    from kvlayer.testing import http_json
    from tests.integration.test_vllm import make_prompts

    srv, model, tmp = server
    base = srv.url

    def _http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return http_json(method, url, body)
    prompt = make_prompts()["long"]  # token ids
    body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True}
    code, cold = _http("POST", base + "/v1/completions", body)
    assert code == 200, cold
    text = _http("GET", base + "/metrics")[1]
    # every series is there from the start, with vLLM's labels (zero until something happens)
    assert _series(text, "vllm:kvlayer_load_errors_total")
    assert all('model_name="' in k and 'engine="' in k for k in _series(text, "vllm:kvlayer_lookups_total"))
    vllm_hits0 = sum(_series(text, "vllm:external_prefix_cache_hits_total").values())
    assert _http("POST", base + "/reset_prefix_cache")[0] == 200
    code, warm = _http("POST", base + "/v1/completions", body)
    assert code == 200, warm
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
    files = 0
    deadline = time.monotonic() + 30  # background saves land after the request; their stats with the next step
    while True:
        text = _http("GET", base + "/metrics")[1]
        files = len(list((tmp / "disk").rglob("*.kvb")))
        saved = sum(_series(text, "vllm:kvlayer_saved_chunks_total").values())
        if (saved == files and files > 0) or time.monotonic() > deadline:
            break
        _http("POST", base + "/v1/completions", body)  # a step carries the worker's last stats
        time.sleep(0.5)
    hits = _series(text, "vllm:kvlayer_hit_tokens_total")
    vllm_hits = sum(_series(text, "vllm:external_prefix_cache_hits_total").values()) - vllm_hits0
    assert sum(hits.values()) == vllm_hits > 0, (hits, vllm_hits)  # vLLM's own count of our tokens
    # the engine core's scheduler knows only that the worker process holds the chunks: tier "worker"
    assert all('tier="worker"' in k or 'tier="cpu"' in k for k, v in hits.items() if v > 0), hits
    assert saved == files > 0
    # the worker process knows which of its tiers served the loads
    reads = _series(text, "vllm:kvlayer_tier_reads_total")
    assert any('tier="cpu"' in k and v > 0 for k, v in reads.items()), reads
    assert sum(_series(text, "vllm:kvlayer_loaded_bytes_total").values()) > 0
    assert sum(_series(text, "vllm:kvlayer_load_seconds_count").values()) > 0
    assert sum(_series(text, "vllm:kvlayer_save_seconds_count").values()) > 0
    assert sum(_series(text, "vllm:kvlayer_load_errors_total").values()) == 0


if __name__ == "__main__":
    name, arg_file = sys.argv[1], sys.argv[2]
    a = json.loads(Path(arg_file).read_text())
    res = globals()[f"scenario_{name}"](a)
    Path(a["out"]).write_text(json.dumps(res))
