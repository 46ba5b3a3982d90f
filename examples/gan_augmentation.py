"""Synthesise an augmentation set with GANs: train, aggregate with AGGrGAN, write a folder.

    python examples/gan_augmentation.py [OUTPUT_DIR] [--epochs N]

1. trains a DCGAN and a WGAN-GP on phantom brain slices with lesions (any `data=` option works
   the same way, e.g. `data=nifti_slices data.train.root=/data/brats`),
2. aggregates their generators with AGGrGAN (best two candidates by SSIM to real slices, merged
   by local sharpness), and
3. writes the synthetic slices with a `selection.csv` that records which generators each image
   came from.

The defaults are tiny (32x32 slices, one epoch) so that it finishes in about a minute on a CPU;
use `--epochs 20 --size 64` for images that look like heads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import medgen
from medgen.api import read_references
from medgen.models import AGGrGAN


def train_gan(experiment: str, output: Path, size: int, epochs: int) -> Path:
    """Train one of the GAN experiments and return its exported model folder."""
    stages = ["[64, 32, 16]", "[16, 32, 64]"]  # three x2 stages: 4 -> 32 px, or 8 -> 64 px
    cfg = medgen.compose(
        "train",
        [
            f"experiment={experiment}",
            f"paths.output_dir={output / experiment}",
            f"data.train.size={size}",
            "data.train.length=64",
            "data.val.length=8",
            "data.batch_size=16",
            f"trainer.max_epochs={epochs}",
            f"model.generator.channels={stages[0]}",
            f"model.discriminator.channels={stages[1]}",
            "~callbacks.progress_bar",
            "num_samples=0",
        ],
    )
    return Path(medgen.train(cfg)["model_dir"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="outputs/gan_augmentation", type=Path)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=8)
    args = parser.parse_args()

    folders = [train_gan(e, args.output, args.size, args.epochs) for e in ("dcgan", "wgan_gp")]

    # Real slices to select against: here validation phantoms written as 16-bit PNGs.
    real = torch.stack(
        [
            d["image"]
            for d in medgen.data.PhantomDataset(spatial_dims=2, size=args.size, length=4, offset=9)
        ]
    )
    ensemble = AGGrGAN.from_generators(folders, names=["dcgan", "wgan_gp"], k=2)
    reference_dir = args.output / "real"
    medgen.api.write_images(ensemble, real, reference_dir, prefix="real")
    reference = read_references(reference_dir, ensemble)

    paths = ensemble.write_dataset(args.output / "synthetic", args.num_samples, reference=reference)
    print(f"wrote {len(paths)} images and selection.csv to {args.output / 'synthetic'}")
    print((args.output / "synthetic" / "selection.csv").read_text().splitlines()[1])


if __name__ == "__main__":
    main()
