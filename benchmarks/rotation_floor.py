"""The floor under the rotated int codecs' speed on this CPU: the Hadamard rotation alone (issue 16).

    python benchmarks/rotation_floor.py --quick     # ~10 s; last stdout line = JSON

Issue 16 asks for encode >= 0.25x and decode >= 0.4x memcpy (``benchmarks/codecs.py``). Both
directions apply the 64-point transform to every value, so no kernel of this scheme is faster
than the transform itself. This builds ``benchmarks/rotation_floor.cpp`` (which includes the
codec kernels' source, ``csrc/cpu/codec.cpp``, so it times their own ``fwht64_regs``, ``load16``,
``store16`` and ``codes16``) with the kernels' flags and times, on one thread, CPU clock,
interleaved, medians:

* ``memcpy`` of the fp16 bytes (the baseline);
* ``convert``: fp16 -> fp32 registers -> fp16, the data movement every codec pays;
* ``rotate``: the same plus the transform;
* ``decode4_floor``: packed 4-bit codes -> floats -> transform -> fp16: an int4 decode without
  its dequantization multiply-add and without RoPE, so an upper bound on the real decoder.

The values are synthetic (fp16 in [1, 2), pseudo-random codes): none of these loops branches on
data, so real KV would time the same. Needs AVX-512 (the kernels' fast path); elsewhere it
says so and reports nulls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import add_output_args, emit_json, markdown_table, write_results

from kvlayer.codec import _ext

HERE = Path(__file__).resolve().parent
#: one SmolLM2-135M chunk of 256 tokens: 30 layers x (K, V) x 256 x 3 heads x 64
CHUNK_ELEMENTS = 30 * 2 * 256 * 3 * 64
#: the issue's targets, against memcpy
TARGETS = {"encode": 0.25, "decode": 0.4}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(out_dir: Path) -> Path:
    """The benchmark binary, built like the kernels (same compiler and flags, no ``-shared``)."""
    cxx = _ext.find_compiler()
    if cxx is None:
        raise SystemExit("no C++ compiler (g++/c++ or $CXX): nothing to measure")
    exe = out_dir / "rotation_floor"
    flags = [f for f in _ext.FLAGS if f not in ("-shared", "-fPIC")]
    cmd = [cxx, *flags, f"-I{_ext.SOURCE.parent}", str(HERE / "rotation_floor.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def measure(exe: Path, elements: int, repeats: int) -> dict[str, float] | None:
    """Median seconds per loop, or None where the CPU lacks the fast path."""
    res = subprocess.run([str(exe), str(elements), str(repeats)], capture_output=True, text=True)
    if res.returncode == 2 and res.stdout.startswith("unsupported"):
        _log(res.stdout.strip())
        return None
    if res.returncode not in (0, 1):
        raise SystemExit(f"rotation_floor failed ({res.returncode}): {res.stderr.strip()}")
    return {name: float(sec) for name, sec in (line.split() for line in res.stdout.splitlines())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 chunks, 9 repeats (~10 s)")
    ap.add_argument("--chunks", type=int, default=None,
                    help="SmolLM2-sized chunks of fp16 to stream (default 4 quick, 8 full, as benchmarks/codecs.py)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds (default 9 quick, 25 full)")
    add_output_args(ap)
    args = ap.parse_args(argv)
    chunks = args.chunks or (4 if args.quick else 8)
    repeats = args.repeat or (9 if args.quick else 25)
    elements = chunks * CHUNK_ELEMENTS
    nbytes = 2 * elements
    load = os.getloadavg()
    _log(f"{chunks} chunk(s) of {CHUNK_ELEMENTS} fp16 values ({nbytes / 1e6:.1f} MB), {repeats} rounds; "
         f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    with tempfile.TemporaryDirectory(prefix="kvlayer-floor-") as tmp:
        sec = measure(build(Path(tmp)), elements, repeats)
    result: dict[str, Any] = {"loadavg_1m": load[0], "bytes": nbytes}
    if sec is None:
        result.update(memcpy_gbps=None, convert_vs_memcpy=None, rotate_vs_memcpy=None, decode4_floor_vs_memcpy=None)
        emit_json(result)
        return result
    gbps = {k: nbytes / v / 1e9 for k, v in sec.items()}
    ratio = {k: sec["memcpy"] / v for k, v in sec.items()}
    for k in sec:
        _log(f"{k:14s} {gbps[k]:7.2f} GB/s  {ratio[k]:.3f}x memcpy")
    # A kernel that must rotate every value and also dequantize cannot beat decode4_floor.
    _log(f"targets: encode >= {TARGETS['encode']}x, decode >= {TARGETS['decode']}x memcpy; "
         f"the rotation alone runs at {ratio['rotate']:.3f}x, an int4 decode without its arithmetic at "
         f"{ratio['decode4_floor']:.3f}x")
    result.update(
        memcpy_gbps=gbps["memcpy"],
        convert_vs_memcpy=ratio["convert"],
        rotate_vs_memcpy=ratio["rotate"],
        decode4_floor_vs_memcpy=ratio["decode4_floor"],
        rotate_gbps=gbps["rotate"],
        decode4_floor_gbps=gbps["decode4_floor"],
    )
    rows = [{"_name": k, "gbps": gbps[k], "vs_memcpy": ratio[k]} for k in sec]
    md = (
        "# Rotation floor\n\n"
        f"Generated by `python benchmarks/rotation_floor.py{' --quick' if args.quick else ''}`: {chunks} chunk(s) of "
        f"SmolLM2-135M's shape ({nbytes / 1e6:.1f} MB fp16), {repeats} interleaved rounds, medians, one thread, CPU "
        f"clock; load average {load[0]:.2f}. `rotate` = load + the codec's 64-point transform + store; "
        "`decode4_floor` = an int4 decode without its dequantization arithmetic and RoPE (an upper bound on "
        f"the real decoder). Issue 16's targets: encode >= {TARGETS['encode']}x, decode >= {TARGETS['decode']}x "
        "memcpy.\n\n" + markdown_table(rows, ["gbps", "vs_memcpy"], first="loop")
    )
    write_results("rotation_floor", {"result": result, "seconds": sec}, md, args)
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
