"""Wall time of TAP selection on a DiT-sized pool: 20k entries of 1024-dim features from 50 sampling steps.

Random features (timing only, not quality); default SelectorParams; one run on this machine's CPU.
Usage: python benchmarks/tap_time.py [--pool 20000] [--dim 1024] [--budget 800] [--steps 50]
Writes benchmarks/results/tap-time-cpu.json.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import sklearn
from threadpoolctl import threadpool_info

from qandc.artifacts import write_json
from qandc.calibration.selection import SelectorParams, select


def cpu_description() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    threads = ", ".join(sorted({f"{p['internal_api']} {p['num_threads']} threads" for p in threadpool_info()}))
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{os.cpu_count()} cores {model} ({threads}; load average before run {load})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=800)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tap-time-cpu.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.pool, args.dim), dtype=np.float32)
    step = rng.integers(0, args.steps, args.pool)
    t = np.linspace(999, 0, args.steps).round()[step]  # original timestep of each sampling step
    params = SelectorParams()
    cpu = cpu_description()
    start = time.perf_counter()
    chosen = select("tap", x, t, step, args.budget, args.seed, params)
    seconds = time.perf_counter() - start
    assert len(chosen) == args.budget
    print(f"tap: pool {args.pool} x {args.dim}, budget {args.budget}: {seconds:.2f} s on {cpu}")
    write_json(args.out, {"pool": args.pool, "dim": args.dim, "budget": args.budget, "steps": args.steps,
                          "params": params.to_dict(), "seconds": seconds, "cpu": cpu,
                          "scikit-learn": sklearn.__version__, "numpy": np.__version__})
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
