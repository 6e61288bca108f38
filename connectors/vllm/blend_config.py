"""CacheBlend options of the vLLM connector: ``kv_connector_extra_config["blend"]``.

Off by default: a blended prefill is approximate (at the calibrated quality), so an operator
turns it on for an engine, and a request can still turn it off (``kv_transfer_params``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BlendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Blend prompts that contain registered documents (else documents are only prefix hits).
    enabled: bool = False
    #: Require a passing calibration record for the engine's model (``kvlayer blend calibrate``,
    #: keyed by the engine's KVSpec model fingerprint); off = ``ungated_ratio`` for every model.
    gate: bool = True
    #: The calibration record to trust (e.g. the fingerprint ``kvlayer blend calibrate`` printed
    #: for this checkpoint); default: the engine's KVSpec model fingerprint.
    calibration_key: str | None = None
    #: Recompute ratio when the gate is off and the request names none.
    ungated_ratio: float = Field(default=0.15, ge=0.0, le=1.0)
    #: Shortest document run worth blending, in tokens (shorter runs are computed as new text).
    min_match: int = Field(default=16, ge=1)
    #: n-gram size of the document index that finds documents inside prompts.
    ngram: int = Field(default=8, ge=1)
    #: Seconds between scans of the shared tiers for documents other replicas registered.
    sync_s: float = Field(default=2.0, ge=0.0)
