"""kvlayer's vLLM v1 KV connector: ``"kv_connector": "KVLayerConnector",
"kv_connector_module_path": "kvlayer.connectors.vllm"``.

Stats come from the connector object: ``connector_of(llm).stats()`` for an in-process engine.
``KVLayerConnector`` is imported lazily (vLLM's factory looks it up with ``getattr``), so the
config, spec and metadata-free helpers here import without loading vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvlayer.errors import KVLayerError

if TYPE_CHECKING:
    from .blend_connector import KVLayerBlendConnector
    from .connector import KVLayerConnector

__all__ = ["KVLayerBlendConnector", "KVLayerConnector", "connector_of"]


def __getattr__(name: str) -> Any:
    if name == "KVLayerConnector":
        from .connector import KVLayerConnector

        return KVLayerConnector
    if name == "KVLayerBlendConnector":
        from .blend_connector import KVLayerBlendConnector

        return KVLayerBlendConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def connector_of(llm: Any) -> KVLayerConnector:
    """The scheduler-side kvlayer connector of an ``LLM`` or ``LLMEngine`` whose engine core runs in
    this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). With the "uni" executor its ``stats()``
    include the worker side too."""
    from .connector import KVLayerConnector

    engine = getattr(llm, "llm_engine", llm)
    core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    if scheduler is None:
        raise KVLayerError("the engine core runs in another process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                           "to reach its kvlayer connector from here")
    connector = scheduler.get_kv_connector()
    if not isinstance(connector, KVLayerConnector):
        raise KVLayerError(f"this engine's KV connector is {type(connector).__name__}, not KVLayerConnector")
    return connector
