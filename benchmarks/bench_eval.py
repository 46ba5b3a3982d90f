"""Cost of the evaluation measures, as JSON: FD paths, bootstrap, audit, streaming FD.

- ``fd``: :func:`medgen.metrics.frechet_distance` with fewer samples than features (the
  singular-value path) against the two ``F x F`` eigendecompositions of the general path, timed
  alternately in one process (median of repeats), and the relative difference of their values;
- ``audit``: seconds per memorisation audit of ``--samples`` 2D phantom samples against
  ``--train`` training images (64x64 grid, flips and shifts up to 2 cells);
- ``streaming``: :class:`medgen.metrics.FrechetDistance` against the batch function on the same
  random-conv features (values agree; the streaming state does not grow with the sample count).

Run:  python benchmarks/bench_eval.py [--features 2048] [--samples 200] [--train 400]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

import medgen
from medgen.data.phantoms import head_phantom
from medgen.metrics import FrechetDistance, frechet_distance, memorisation_audit


def _eig_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """The general path: two F x F symmetric eigendecompositions."""
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root @ cov_b @ root
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    mean = (a.mean(0) - b.mean(0)).square().sum()
    return float(mean + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/eval_cpu.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(args.samples, args.features, generator=g, dtype=torch.float64)
    b = torch.randn(args.samples, args.features, generator=g, dtype=torch.float64) * 1.1
    svd_s, eig_s = [], []
    for _ in range(args.repeats):  # alternate the two paths
        svd_s.append(_time(lambda: frechet_distance(a, b), 1))
        eig_s.append(_time(lambda: _eig_fd(a, b), 1))
    ours, ref = frechet_distance(a, b), _eig_fd(a, b)

    train = [head_phantom(2, 64, index=i) for i in range(args.train)]
    samples = [head_phantom(2, 64, index=10_000 + i) for i in range(args.samples)]
    audit_s = _time(lambda: memorisation_audit(samples, train), 1)

    from medgen.features import RandomConvFeatures

    ext = RandomConvFeatures(2, width=16)
    real, fake = torch.stack(train[:128]), torch.stack(samples[:128])
    metric = FrechetDistance(ext, 128)
    for chunk in range(0, 128, 32):
        metric.update(real[chunk : chunk + 32], real=True)
        metric.update(fake[chunk : chunk + 32], real=False)
    streaming, batch = float(metric.compute()), frechet_distance(ext(real), ext(fake))

    result = {
        "medgen": medgen.__version__,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "fd": {
            "samples": args.samples,
            "features": args.features,
            "singular_value_path_s": statistics.median(svd_s),
            "eigendecomposition_path_s": statistics.median(eig_s),
            "ratio_ours_over_eig": statistics.median(svd_s) / statistics.median(eig_s),
            "relative_difference": abs(ours - ref) / ref,
        },
        "audit": {"samples": args.samples, "train": args.train, "grid": 64, "seconds": audit_s},
        "streaming": {
            "value": streaming,
            "batch_value": batch,
            "relative_difference": abs(streaming - batch) / batch,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
