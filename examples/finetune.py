"""Fine-tune on new data: pretrain (or take) a VAE, start a new run from its export, with LoRA.

1. Train the quickstart VAE on healthy phantom slices (stands in for weights you already have).
2. Fine-tune it on slices with lesions (stands in for your hospital data): ``model.init_from``
   loads the export and prints a load report; LoRA adapters of rank 4 train instead of the
   whole net; the run writes the merged model and the adapter alone.
3. Compare validation PSNR before and after, and reload the adapter on its base (SHA-256 checked).

Run:  python examples/finetune.py OUTPUT_DIR [--epochs 2] [--size 32] [--length 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import medgen
from medgen.data import PhantomDataset
from medgen.metrics.pairwise import psnr


def val_psnr(model, size: int) -> float:
    """Mean PSNR of reconstructions of 8 held-out lesion slices."""
    data = PhantomDataset(spatial_dims=2, size=size, length=8, seed=99, lesions=(1, 3))
    x = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(8)]).float()
    with torch.no_grad():
        return float(psnr(model.reconstruct(x).clamp(0, 1), x, data_range=1.0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    small = [
        f"data.train.size={args.size}",
        f"data.val.size={args.size}",
        f"data.train.length={args.length}",
        "data.val.length=8",
        f"trainer.max_epochs={args.epochs}",
        "num_samples=0",
        "~callbacks.progress_bar",
    ]
    base = medgen.train(
        medgen.compose(
            "train", ["experiment=quickstart", f"paths.output_dir={args.output / 'base'}", *small]
        )
    )
    tuned = medgen.train(
        medgen.compose(
            "train",
            [
                "experiment=finetune_vae",
                f"model.init_from={base['model_dir']}",
                "model.finetune.lr_multipliers={}",
                "+model.finetune.lora={r: 4, alpha: 4}",
                "model.optimizer.lr=5e-3",
                f"paths.output_dir={args.output / 'finetuned'}",
                *small,
            ],
        )
    )
    report = json.loads((Path(tuned["output_dir"]) / "init_from.json").read_text())
    print(f"load report: {report['loaded']} loaded, {len(report['missing'])} missing")
    before = val_psnr(medgen.load(base["model_dir"]), args.size)
    after = val_psnr(medgen.load(tuned["model_dir"]), args.size)
    print(f"lesion slices, PSNR before fine-tuning: {before:.2f} dB, after: {after:.2f} dB")
    adapter = medgen.load(tuned["adapter_dir"])  # the adapter applied to its base model
    print(f"adapter on its base: {val_psnr(adapter, args.size):.2f} dB")


if __name__ == "__main__":
    main()
