"""CacheBlend for kvlayer: reuse cached documents at any position with selective recompute.

See :mod:`kvlayer.blend.blend` for the entry point (:class:`Blender`).
"""

from kvlayer.blend.blend import BlendConfig, Blender, BlendResult, scratch_cache
from kvlayer.blend.calibrate import Probe, calibrate, probes_from_text
from kvlayer.blend.gate import CalibrationStore
from kvlayer.blend.rope import Rope, rerotate
from kvlayer.blend.runner import Runner, weights_fingerprint
from kvlayer.blend.segments import DocumentIndex, Segment, plan
from kvlayer.blend.select import SelectionPolicy

__all__ = [
    "BlendConfig", "BlendResult", "Blender", "CalibrationStore", "DocumentIndex", "Probe", "Rope", "Runner",
    "Segment", "SelectionPolicy", "calibrate", "plan", "probes_from_text", "rerotate", "scratch_cache",
    "weights_fingerprint",
]
