"""StyleGAN2-ADA on a small dataset: train, watch the augmentation probability, sample, reload.

    python examples/stylegan2_small_data.py [OUTPUT_DIR] [--steps N] [--size PX] [--images N]

1. trains the ``stylegan2_2d_small_data`` experiment (100 phantom slices, ADA on) through the
   same entry point as ``medgen-train experiment=stylegan2_2d_small_data``; the ADA controller
   is made fast (``kimg``) so that its probability ``p`` moves within a short run,
2. prints ``p`` and ``r_t = E[sign(D(real))]`` as logged during training,
3. reloads the exported model with ``medgen.load`` and writes truncated and untruncated samples.

The defaults are tiny (16 px, a few steps) so that it runs in seconds on a CPU; use
``--size 64 --steps 2000 --images 100`` for the real experiment (minutes per hundred steps on a
CPU, seconds on a GPU).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import medgen
from medgen.api import write_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", nargs="?", default="runs/stylegan2_small_data")
    parser.add_argument("--steps", type=int, default=8, help="generator steps")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
    output = Path(args.output)

    narrow = args.size < 64  # tiny demo: narrow nets
    cfg = medgen.compose(
        "train",
        [
            "experiment=stylegan2_2d_small_data",
            f"paths.output_dir={output}",
            f"data.train.size={args.size}",
            f"data.train.length={args.images}",
            "data.val.length=8",
            "data.batch_size=8",
            f"trainer.max_steps={2 * args.steps}",  # Lightning counts both optimisers' steps
            "trainer.log_every_n_steps=1",
            "model.augment.kimg=0.2",  # p can move 0 -> 1 in 200 images: visible in a short run
            "model.augment.interval=1",
            *(
                ["model.generator.channel_base=128", "model.discriminator.channel_base=128"]
                * narrow
            ),
            "~callbacks.progress_bar",
            "num_samples=0",
            "overwrite=true",
        ],
    )
    result = medgen.train(cfg)

    with open(output / "logs" / "csv" / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("train/ada_p")]
    for row in rows:
        r_t = row.get("train/ada_rt") or "-"
        print(f"step {row['step']:>4}: ada p = {float(row['train/ada_p']):.3f}, r_t = {r_t}")

    model = medgen.load(result["model_dir"])
    print(f"final ada p: {model.ada_p:.3f}")
    for psi in (1.0, 0.7):
        folder = output / f"samples_psi{psi}"
        paths = write_samples(model, folder, 4, seed=0, truncation_psi=psi)
        print(f"wrote {len(paths)} samples (truncation psi {psi}) to {folder}")


if __name__ == "__main__":
    main()
