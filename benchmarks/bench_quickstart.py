"""Wall time of the ``quickstart`` experiment end to end (train, export, samples), as JSON.

Run:  python benchmarks/bench_quickstart.py [--device cpu|cuda] [--epochs N]

Writes ``benchmarks/results/quickstart_<device>.json`` with the wall time, the number of
optimisation steps, steps per second and the final validation metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

import medgen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=None, help="default: the experiment's")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "experiment=quickstart",
            f"paths.output_dir={tmp}",
            f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
            "~callbacks.progress_bar",
        ]
        if args.epochs is not None:
            overrides.append(f"trainer.max_epochs={args.epochs}")
        cfg = medgen.compose("train", overrides)
        start = time.perf_counter()
        result = medgen.train(cfg)
        wall = time.perf_counter() - start
        steps = torch.load(result["checkpoint"], weights_only=True)["global_step"]

    record = {
        "benchmark": "quickstart",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "medgen": medgen.__version__,
        "wall_seconds": round(wall, 2),
        "steps": steps,
        "steps_per_second": round(steps / wall, 3),
        "metrics": result["metrics"],
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quickstart_{args.device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
