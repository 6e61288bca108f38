"""Store + retrieve throughput of 256-token chunks (SmolLM2-135M KV shape: 30 layers x 3 kv heads
x 64 dims, fp16 = 5.6 MiB a chunk) through the CPU tier and the disk tier, each as a ratio to its
physical baseline measured in the same run:

- CPU tier vs a torch tensor copy of the same bytes (memcpy);
- disk tier vs a plain file write (temp + rename, like the tier) and read of the same bytes.

Ratios compare round trips (harmonic mean of store and retrieve). The last stdout line is JSON with
``cpu_vs_memcpy`` and ``disk_vs_file``.

    python benchmarks/store.py [--quick] [--chunks N] [--repeat R]
"""

from __future__ import annotations

import argparse
import sys

from _common import add_output_args, emit_json, write_results

from kvlayer import bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under 60 s: fewer chunks and repeats")
    ap.add_argument("--chunks", type=int, default=32, help="chunks per run (default 32 = 180 MB)")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions; best is kept")
    ap.add_argument("--dir", help="where the disk tier writes (default: a temp dir); use a real disk")
    add_output_args(ap)
    args = ap.parse_args()
    chunks, repeat = (12, 3) if args.quick else (args.chunks, args.repeat)
    res = bench.run(num_chunks=chunks, repeat=repeat, workdir=args.dir, progress=sys.stderr.isatty())
    table = bench.render_table(res)
    print(table)
    md = (
        "# Store benchmark (`benchmarks/store.py`)\n\n"
        f"{res['num_chunks']} chunks of {res['chunk_mib']} MiB (256 tokens of SmolLM2-135M-shaped fp16 KV). "
        "Baselines measured in the same run: torch tensor copy (CPU), plain file write+rename and read (disk). "
        "'vs baseline' compares round trips (store + retrieve). The CPU tier's retrieve is zero-copy: it returns "
        "a verified view of the stored blob.\n\n" + table + "\n"
    )
    write_results("store", res, md, args)
    emit_json({k: res[k] for k in ("cpu_vs_memcpy", "disk_vs_file", "chunk_mib", "num_chunks", "paths")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
