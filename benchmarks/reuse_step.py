"""FLOPs and CPU time of a reuse step (reuse-all plan, FORA) against a full step.

Random weights (every layer non-zero); timings are medians on this machine's CPU, ratios measured in one run.
Usage: python benchmarks/reuse_step.py [--configs DiT-XL/2 DiT-S/2] [--batch 2] [--repeats 3]
Writes benchmarks/results/reuse-step-cpu.json.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from qandc.artifacts import write_json
from qandc.model import DiT, initialize_weights, named_config
from qandc.model.graphs import engine_graphs, example_feeds
from qandc.sampling import CachePlan


def measure(name: str, batch: int, repeats: int) -> dict:
    model = initialize_weights(DiT(named_config(name, input_size=32)), zero_init=False).eval()
    graphs = engine_graphs(CachePlan.interval(2), model.branch_names)  # the reuse graph reuses every branch
    feeds = example_feeds(model, graphs, batch)
    result = {"config": name, "input": list(feeds["full"]["x"].shape)}
    with torch.no_grad():
        for path in ("full", "reuse"):
            fn = lambda: model.forward_graph(graphs[path], feeds[path])  # noqa: E731
            with FlopCounterMode(display=False) as counter:
                fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            result[f"{path}_gflop"] = counter.get_total_flops() / 1e9
            result[f"{path}_ms"] = 1000 * statistics.median(times)
    result["flop_ratio_reuse_over_full"] = result["reuse_gflop"] / result["full_gflop"]
    result["time_ratio_reuse_over_full"] = result["reuse_ms"] / result["full_ms"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["DiT-XL/2", "DiT-S/2"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reuse-step-cpu.json"))
    args = parser.parse_args()
    rows = [measure(name, args.batch, args.repeats) for name in args.configs]
    for r in rows:
        print(f"{r['config']:9s} full {r['full_gflop']:8.1f} GFLOP {r['full_ms']:9.1f} ms | reuse "
              f"{r['reuse_gflop']:6.2f} GFLOP {r['reuse_ms']:7.1f} ms | "
              f"FLOP ratio {r['flop_ratio_reuse_over_full']:.4f}"
              f" time ratio {r['time_ratio_reuse_over_full']:.4f}")
    write_json(args.out, {"device": f"cpu ({platform.processor() or platform.machine()}, "
                                    f"{torch.get_num_threads()} threads)", "torch": torch.__version__,
                          "batch": args.batch, "weights": "random, every layer non-zero", "results": rows})
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
