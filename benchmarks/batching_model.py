"""A queue model of `qandc serve`'s batcher, to choose its batch-size buckets: Poisson arrivals of requests of a few
images, a batch formed once the engine is idle and the oldest request has waited --max-wait-ms (up to --max-batch
images), padded to the next bucket, and a batch's time linear in its padded size, fitted to the batches a GPU load run
measured (`serve-<card>*.json`: each load point's mean batch and batch time). It prints p50 / p99 latency at fractions
of the saturating rate for each bucket ladder and writes benchmarks/results/batching-model-<card>.json. A model, not a
measurement: it leaves out the server's own latency (HTTP, queueing, copies), which `serve_load.py` measures.

    python benchmarks/batching_model.py                      # from serve-h200-rungraphs.json, its request size
    python benchmarks/batching_model.py --images-per-request 3  # batching-model-h200-3-images.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from qandc.artifacts import sha256_file
from qandc.serve import batch_buckets

RESULTS = Path(__file__).resolve().parent / "results"
LADDERS = {  # the buckets up to max_batch of each ladder
    "powers of two": lambda m: sorted({2 ** k for k in range(m.bit_length()) if 2 ** k < m} | {m}),
    "qandc (powers of two and midpoints from 12)": batch_buckets,
    "multiples of 8": lambda m: sorted({1, 2, 4} | set(range(8, m, 8)) | {m}),
}


def latencies(buckets, rate, images, max_batch, wait, batch_s, seconds, seed) -> tuple[float, float]:
    """(p50, p99) seconds of the requests of `seconds` of Poisson arrivals at `rate` requests a second."""
    rng, t, arrivals = random.Random(seed), 0.0, []
    while t < seconds:
        t += rng.expovariate(rate)
        arrivals.append(t)
    done, queue, i, free = [], [], 0, 0.0
    while i < len(arrivals) or queue:
        if not queue:
            queue.append(arrivals[i])
            i += 1
        start = max(free, queue[0] + wait)  # the engine idle and the oldest waited max_wait
        while i < len(arrivals) and arrivals[i] <= start:
            queue.append(arrivals[i])
            i += 1
        n = min(len(queue), max_batch // images)
        free = start + batch_s(next(b for b in buckets if b >= n * images))
        done += [free - a for a in queue[:n]]
        queue = queue[n:]
    return float(np.percentile(done, 50)), float(np.percentile(done, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", default=str(RESULTS / "serve-h200-rungraphs.json"))
    parser.add_argument("--images-per-request", type=int, help="default: the measured run's")
    parser.add_argument("--seconds", type=float, default=200.0, help="simulated seconds a point")
    args = parser.parse_args()
    measured = json.loads(Path(args.measured).read_text())
    point = measured["points"][-1]
    rows = [point["saturating"], *point["loads"]]
    slope, fixed = np.polyfit([r["mean_batch_images"] for r in rows], [r["batch_ms"]["seconds"] for r in rows], 1)
    max_batch, wait = point["max_batch"], measured["max_wait_ms"] / 1000
    images = args.images_per_request or measured["images_per_request"]
    saturating = point["saturating"]["requests_per_s"] * measured["images_per_request"] / images
    print(f"a batch: {fixed:.1f} ms + {slope:.3f} ms an image (fitted to {Path(args.measured).name}); "
          f"saturating rate {saturating:.0f} requests/s of {images} images")
    # the measured run by name and content: a later load run rewrites the file of that name
    result = {"measured": Path(args.measured).name, "measured_sha256": sha256_file(args.measured),
              "batch_ms": {"fixed": fixed, "per_image": slope},
              "max_batch": max_batch, "max_wait_ms": wait * 1000, "images_per_request": images, "ladders": {}}
    for name, ladder in LADDERS.items():
        buckets, points = ladder(max_batch), []
        for fraction in (0.25, 0.5, 0.75):
            p50, p99 = latencies(buckets, fraction * saturating, images, max_batch, wait,
                                 lambda size: (fixed + slope * size) / 1000, args.seconds, seed=0)
            points.append({"fraction": fraction, "p50_s": p50, "p99_s": p99, "p99_over_p50": p99 / p50})
        result["ladders"][name] = {"buckets": buckets, "points": points}
        print(f"{name:45s} " + "  ".join(f"{p['fraction']:.2f}x: p50 {p['p50_s'] * 1000:5.1f} ms p99/p50 "
                                          f"{p['p99_over_p50']:.2f}" for p in points))
    other_size = "" if images == measured["images_per_request"] else f"-{images}-images"
    out = RESULTS / f"batching-model-{measured['card']}{other_size}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(RESULTS.parents[1])}")


if __name__ == "__main__":
    main()
