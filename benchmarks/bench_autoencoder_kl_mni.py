"""Our AutoencoderKL against MONAI's, trained identically on 2D slices of the MNI152 T1 template.

Data: the MNI152 T1 template shipped inside nilearn (``load_mni152_template(resolution=2)``,
91 x 109 x 91, no download), axial slices ``z`` in ``[z_min, z_max)``, zero-padded to 96 x 112
(a multiple of the downsampling factor 4), intensities divided by the volume's maximum (so in
[0, 1]); every ``--val-every``-th slice is held out for validation, the others train.

Both models: the same configuration (channels, residual blocks, latent channels, GroupNorm groups,
no attention), the same seed for the data order, the same optimiser (Adam, same lr), the same
number of steps and batch size, and the same loss, MONAI's brain-LDM form without the adversarial
and perceptual terms: ``mean|x - x̂| + kl_weight * mean_b sum KL`` with ``kl_weight = 1e-6``,
``x̂`` decoded from a posterior sample. Ours is trained through its own loss
(:meth:`medgen.models.AutoencoderKL.autoencoder_terms`), MONAI's with the tutorial's code.
Validation: PSNR (data range 1) and SSIM of the reconstruction from the posterior mean, on the
held-out slices, with medgen's metric functions for both.

Run:  python benchmarks/bench_autoencoder_kl_mni.py [--steps 300] [--threads 2]
Writes benchmarks/results/autoencoder_kl_mni.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import medgen
from medgen.metrics.pairwise import psnr, ssim
from medgen.models import AutoencoderKL

CONFIG = dict(channels=(16, 32, 64), num_res_blocks=1, latent_channels=4, norm_num_groups=16)


def mni_slices(z_min: int, z_max: int, val_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation axial slices ``(N, 1, 96, 112)`` in [0, 1]."""
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    volume = volume / volume.max()
    slices = torch.from_numpy(volume[:, :, z_min:z_max]).permute(2, 0, 1)[:, None]  # (N,1,91,109)
    slices = F.pad(slices, (0, 112 - slices.shape[-1], 0, 96 - slices.shape[-2]))
    val = torch.arange(len(slices)) % val_every == val_every // 2
    return slices[~val].contiguous(), slices[val].contiguous()


def monai_step(model, x: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """MONAI's brain-LDM autoencoder loss without the adversarial and perceptual terms."""
    reconstruction, z_mu, z_sigma = model(x)
    recon = F.l1_loss(reconstruction.float(), x.float())
    kl = 0.5 * torch.sum(
        z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3]
    )
    kl = torch.sum(kl) / kl.shape[0]
    return recon + kl_weight * kl


@torch.no_grad()
def evaluate(reconstruct, val: torch.Tensor) -> dict[str, float]:
    recon = torch.cat([reconstruct(chunk) for chunk in val.split(8)])
    return {
        "psnr": float(psnr(recon, val, data_range=1.0).mean()),
        "ssim": float(ssim(recon, val, data_range=1.0).mean()),
        "l1": float((recon - val).abs().mean()),
    }


def train(name: str, model, step_fn, train_x: torch.Tensor, args) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, start = [], time.perf_counter()
    batches = 0
    while batches < args.steps:
        for idx in torch.randperm(len(train_x), generator=order).split(args.batch_size):
            if batches >= args.steps or len(idx) < args.batch_size:
                break
            loss = step_fn(train_x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            batches += 1
            if batches % 50 == 0:
                print(f"  {name} step {batches}: loss {np.mean(losses[-50:]):.4f}", flush=True)
    seconds = time.perf_counter() - start
    print(f"{name}: {args.steps} steps in {seconds:.0f} s, last loss {np.mean(losses[-20:]):.4f}")
    return {"train_seconds": seconds, "final_loss": float(np.mean(losses[-20:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--z-min", type=int, default=14)
    parser.add_argument("--z-max", type=int, default=78)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["medgen", "monai", "monai_mid"],
        choices=["medgen", "monai", "monai_mid"],
        help="monai: attention off, hence no middle block; monai_mid: MONAI's default middle "
        "block (ResBlock, attention, ResBlock) at the lowest level, as our middle block has two "
        "ResBlocks (without attention)",
    )
    parser.add_argument(
        "--append", action="store_true", help="add to the results already in the output file"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import monai
    from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL

    train_x, val_x = mni_slices(args.z_min, args.z_max, args.val_every)
    print(
        f"MNI152 slices: {len(train_x)} train, {len(val_x)} validation, {tuple(train_x.shape[2:])}"
    )

    torch.manual_seed(args.seed)
    ours = AutoencoderKL(
        net=dict(in_channels=1, attention_levels=None, **CONFIG),
        spatial_dims=2,
        kl_weight=args.kl_weight,
        discriminator=None,
        perceptual={"weight": 0.0},
    )

    def monai_model(mid: bool):
        torch.manual_seed(args.seed)
        return MonaiAutoencoderKL(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            attention_levels=(False,) * len(CONFIG["channels"]),
            with_encoder_nonlocal_attn=mid,
            with_decoder_nonlocal_attn=mid,
            **CONFIG,
        )

    candidates = {"medgen": (ours, lambda x: ours.autoencoder_terms(x)["loss"], ours.reconstruct)}
    for name, mid in (("monai", False), ("monai_mid", True)):
        if name in args.models:
            net = monai_model(mid)
            candidates[name] = (
                net,
                lambda x, net=net: monai_step(net, x, args.kl_weight),
                net.reconstruct,
            )
    out = args.out or Path(__file__).parent / "results" / "autoencoder_kl_mni.json"
    results = json.loads(out.read_text())["results"] if args.append and out.is_file() else {}
    for name in args.models:
        model, step_fn, reconstruct = candidates[name]
        torch.manual_seed(args.seed + 1)  # same posterior noise stream
        record = train(name, model, step_fn, train_x, args)
        model.eval()
        record.update(evaluate(reconstruct, val_x))
        record["parameters"] = sum(p.numel() for p in model.parameters())
        if name == "medgen":
            record["parameters"] = sum(p.numel() for p in ours.net.parameters())
        print(f"{name}: validation PSNR {record['psnr']:.2f} dB, SSIM {record['ssim']:.4f}")
        results[name] = record

    record = {
        "benchmark": "autoencoder_kl_mni",
        "data": {
            "source": "nilearn load_mni152_template(resolution=2)",
            "axial_slices": [args.z_min, args.z_max],
            "val_every": args.val_every,
            "train": len(train_x),
            "val": len(val_x),
            "size": list(train_x.shape[2:]),
        },
        "config": {**CONFIG, "attention": False},
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "lr": args.lr,
            "kl_weight": args.kl_weight,
            "seed": args.seed,
        },
        "threads": torch.get_num_threads(),
        "device": platform.processor() or platform.machine(),
        "versions": {
            "medgen": medgen.__version__,
            "monai": monai.__version__,
            "torch": torch.__version__,
        },
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(markdown_table(record))
    print(f"wrote {out}")


def markdown_table(record: dict) -> str:
    lines = [
        "| model | validation PSNR (dB) | SSIM | L1 | parameters | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in record["results"].items():
        lines.append(
            f"| {name} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['l1']:.4f} | "
            f"{r['parameters']:,} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
