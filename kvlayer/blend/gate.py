"""The quality gate's record: which models were shown to blend well, and at what ratio.

A JSON file ``{fingerprint: record}`` under the user cache dir, written by
:func:`kvlayer.blend.calibrate.calibrate` and read by :class:`~kvlayer.blend.blend.Blender`
before every blend: a model never calibrated, or whose calibration failed (no ratio under the
threshold), gets a full prefill instead of a blend. Kept apart from the calibration procedure,
which itself runs blends, so that imports run one way (calibrate -> blend -> gate).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from kvlayer.config import default_cache_dir

log = logging.getLogger("kvlayer.blend")


def calibration_path() -> Path:
    env = os.environ.get("KVLAYER_BLEND_CALIBRATION")
    return Path(env) if env else default_cache_dir() / "blend_calibration.json"


class CalibrationStore:
    """JSON file ``{fingerprint: record}``; written atomically (temp file + rename)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else calibration_path()

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("cannot read blend calibration %s (%s): treating every model as uncalibrated", self.path, e)
            return {}

    def get(self, fingerprint: str) -> dict[str, Any] | None:
        rec = self.load().get(fingerprint)
        return rec if isinstance(rec, dict) else None

    def put(self, fingerprint: str, record: dict[str, Any]) -> None:
        data = self.load()
        data[fingerprint] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calib-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def verdict(self, fingerprint: str) -> tuple[float | None, str]:
        """(smallest safe ratio or None, reason). None means: do not blend this model."""
        rec = self.get(fingerprint)
        if rec is None:
            return None, f"model {fingerprint} was never calibrated (run `kvlayer blend calibrate`)"
        if rec.get("status") != "ok" or rec.get("ratio") is None:
            return None, f"model {fingerprint} failed blend calibration (no ratio under {rec.get('threshold')})"
        return float(rec["ratio"]), "calibrated"
