"""Latent generation's first stage: train a KL autoencoder, decode a large volume in tiles, and
cache a dataset's latents for the diffusion stage.

    python examples/latent_cache.py [OUTPUT_DIR] [--steps N] [--size S]

1. trains the `autoencoder_kl_3d` experiment for a few steps on phantom volumes (any 3D `data=`
   option works the same way, e.g. `data=nifti_folder data.train.source=/data/brains`),
2. encodes a larger phantom volume and decodes its latent in tiles (tile size in latent voxels),
   blended and, exactly, layer by layer (``layerwise=True``), comparing both with whole-volume
   decoding, then decodes it again straight into a memory-mapped ``.npy`` file (``out=``), with
   the layer-by-layer intermediates in memory-mapped files too, as for a volume larger than
   memory, and
3. runs `medgen-encode` from Python: one `.npy` latent per volume plus `latents.json` with the
   scale factor, read back by `medgen.data.LatentDataset` as unit-variance training data.

The defaults are tiny (16^3 training volumes, a few steps) so that it finishes in well under a
minute on a CPU; `--steps 300 --size 32` gives useful reconstructions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import medgen
from medgen.data import LatentDataset, PhantomDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", nargs="?", type=Path, default=Path("outputs/latent_cache"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()

    # 1. train (the experiment's architecture, shrunk to a few steps)
    cfg = medgen.compose(
        "train",
        [
            "experiment=autoencoder_kl_3d",
            f"paths.output_dir={args.output / 'autoencoder'}",
            f"data.train.size={args.size}",
            "data.train.length=8",
            "data.val.length=2",
            "data.batch_size=2",
            f"trainer.max_steps={args.steps}",
            f"model.adv_start_step={args.steps // 2}",  # the discriminator joins half-way
            "~callbacks.progress_bar",
            "num_samples=0",
        ],
    )
    model_dir = Path(medgen.train(cfg)["model_dir"])
    model = medgen.load(model_dir)
    print(f"autoencoder: {model_dir} (downsampling {model.downsample_factor})")

    # 2. tiled decoding of a volume twice the training size: tiles of 8 latent voxels (32^3)
    volume = PhantomDataset(spatial_dims=3, size=2 * args.size, length=1, seed=7)[0]["image"]
    z = model.encode(volume[None])
    whole = model.decode(z)
    tiled = model.decode(z, tile=args.size // 4, overlap=0.5)
    error = float((tiled - whole).abs().mean() / (whole.max() - whole.min()))
    print(f"latent {tuple(z.shape)}; blended tiles vs whole decoding: mean difference {error:.2e}")
    # exact: every decoder stage over the whole volume, tile by tile with real halos
    exact = model.decode(z, tile=args.size // 4, layerwise=True)
    error = float((exact - whole).abs().max() / (whole.max() - whole.min()))
    print(f"layer-by-layer tiles vs whole decoding: max difference {error:.2e}")
    # ... and straight into a memory-mapped .npy file, for volumes larger than memory; the
    # intermediate volumes go to memory-mapped files in offload_dir (removed afterwards)
    args.output.mkdir(parents=True, exist_ok=True)
    mapped = np.lib.format.open_memmap(
        args.output / "decoded.npy", mode="w+", dtype=np.float32, shape=tuple(whole.shape)
    )
    model.decode(
        z,
        tile=args.size // 4,
        layerwise=True,
        offload_dir=args.output / "offload",
        out=torch.from_numpy(mapped),
    )
    mapped.flush()
    torch.testing.assert_close(torch.from_numpy(np.load(args.output / "decoded.npy")), exact)
    print(f"decoded into {args.output / 'decoded.npy'} (identical to the in-memory result)")

    # 3. cache the latents of a dataset (what `medgen-encode checkpoint=... data=...` does)
    latent_dir = args.output / "latents"
    encode_cfg = medgen.compose(
        "encode",
        [
            f"checkpoint={model_dir}",
            "data=phantom3d",
            f"data.train.size={args.size}",
            "data.train.length=8",
            "data.val.length=2",
            f"output_dir={latent_dir}",
        ],
    )
    medgen.api.encode(encode_cfg)
    index = json.loads((latent_dir / "latents.json").read_text())
    print(f"cached {len(index['splits']['train'])} training latents of shape {index['shape']}")
    print(f"scale factor: {index['scale_factor']:.4f}")
    train = LatentDataset(latent_dir, split="train").latents()
    print(f"scaled training latents: std {float(train.std()):.3f}")
    torch.testing.assert_close(float(train.std()), 1.0, rtol=1e-4, atol=0)


if __name__ == "__main__":
    main()
