"""Volumes per second through the training data pipeline, with and without caching, as JSON.

Writes ``N`` phantom volumes as NIfTI (``.nii.gz``) to a temporary folder, then times two epochs of
a DataLoader over :class:`medgen.data.VolumeDataset` with the MR percentile preset for each cache
mode (``none``: read and normalise every time; ``memory``: MONAI-style in-memory cache of the
read volumes; ``disk``: ``PersistentDataset`` files). The first epoch includes filling the cache.

Run:  python benchmarks/bench_data.py [--volumes 16] [--size 64] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import medgen
from medgen.data import VolumeDataset, head_phantom, write
from medgen.data.presets import MRPercentile


def _epoch(loader: DataLoader) -> float:
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "volumes"
        affine = torch.diag(torch.tensor([1.0, 1.0, 1.5, 1.0], dtype=torch.float64))
        for i in range(args.volumes):
            volume = head_phantom(3, args.size, index=i, noise_std=0.02) * 1000.0
            write(volume, folder / f"subject_{i:03d}.nii.gz", affine=affine)
        for cache in ("none", "memory", "disk"):
            dataset = VolumeDataset(
                folder,
                spatial_dims=3,
                transform=MRPercentile(),
                cache=cache,
                cache_dir=Path(tmp) / f"cache_{cache}" if cache == "disk" else None,
            )
            loader = DataLoader(dataset, batch_size=2, num_workers=args.workers)
            first, second = _epoch(loader), _epoch(loader)
            results.append(
                {
                    "cache": cache,
                    "epoch1_volumes_per_s": round(first, 2),
                    "epoch2_volumes_per_s": round(second, 2),
                }
            )
            print(results[-1], flush=True)

    record = {
        "benchmark": "data_pipeline",
        "volumes": args.volumes,
        "size": args.size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "medgen": medgen.__version__,
        "results": results,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "data_pipeline_cpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
