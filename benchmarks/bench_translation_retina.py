"""Defocus correction on a real image: pix2pix vs Pyramid pix2pix at the same budget.

The fundus photograph shipped with scikit-image (``skimage.data.retina``, 1411x1411 RGB) is
converted to grey, halved in size and blurred with a disk point-spread function of radius
``--radius`` pixels (:func:`medgen.data.phantoms.defocus`, the geometric-optics model of a
defocused lens). Training takes random ``--crop`` crops, the same for the blurred input and the
sharp target, from the left 70% of the fundus; the test set is a fixed grid of crops from the right
30%, which training never sees. All models have the same generator, discriminator, optimiser,
learning-rate policy (pix2pix's "linear": constant, then linear to 0 over the second half;
``--constant-lr`` keeps it constant) and number of steps, and for each seed the same initial
weights and crops; they differ only in the reconstruction term (``--models``): L1 x 100 as in
pix2pix, the BCI pyramid (L1 at 4 scales, 25 each), or L1 x 25 (the pyramid's first level alone,
BCI's ablation baseline). ``--misregister K`` shifts every training target by up to ``K`` pixels
against its input (test pairs stay aligned). ``--contrast`` makes the target ``1 - sharp**0.7``
(inverted, gamma 0.7): a translation whose low frequencies change too, as in stain or MR-contrast
translation, where the pyramid's coarse levels carry information that defocus leaves intact. The default generator is a ResNet (ngf 16, 6
blocks, batch norm) with a global residual whose last convolution starts at zero, so every model
starts from the identity (the blurred input) and learns the correction; ``--generator unet`` uses
pix2pix's UNet, which needs many more steps to reach the input's PSNR.

Reported: mean PSNR / SSIM over the test crops (float protocol, data range 1) of the blurred input
and of each model's output, per seed and as mean and standard deviation over ``--seeds``, with
each model's PSNR difference to pix2pix paired by seed; JSON in
``benchmarks/results/translation_retina_cpu.json`` and a side-by-side figure (input | pix2pix |
pyramid pix2pix | target, first seed) in ``docs/images/translation_retina.png``.

    python benchmarks/bench_translation_retina.py   # 3 models x 3 seeds x 300 steps, ~10 min on 2 cores
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

from medgen.data.io import write
from medgen.data.phantoms import defocus
from medgen.metrics.pairwise import psnr, ssim
from medgen.models import Pix2Pix
from medgen.utils.schedulers import lr_policy

ROOT = Path(__file__).resolve().parents[1]


#: The compared reconstruction terms: pix2pix (L1 x 100), BCI's pyramid (L1 x 25 at 4 scales) and,
#: as BCI's ablation baseline, the pyramid's first level alone (L1 x 25 at full resolution).
MODELS = {
    "pix2pix": {"reconstruction": "l1", "lambda_l1": 100.0},
    "pyramid_pix2pix": {"reconstruction": "pyramid", "pyramid": {"num_levels": 4}},
    "pix2pix_l1_25": {"reconstruction": "l1", "lambda_l1": 25.0},
}


def retina_pair(radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blurred and sharp grey retina ``(1, H, W)`` in [0, 1], and the fundus mask."""
    from skimage import data

    rgb = torch.from_numpy(data.retina()).permute(2, 0, 1).float() / 255.0
    grey = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
    mask = grey > 0.08  # the fundus, without the black surround
    # Stretch the fundus' 1st-99th percentiles to [0, 1] (the photograph is dark and flat).
    low, high = torch.quantile(grey[mask][::50], torch.tensor([0.01, 0.99]))
    grey = ((grey - low) / (high - low)).clamp(0, 1)
    grey = F.avg_pool2d(grey[None], 2)[0]  # 705 x 705
    mask = F.avg_pool2d(mask.float()[None], 2)[0] > 0.99
    return defocus(grey, radius).clamp(0, 1), grey, mask


def crops_inside(mask: torch.Tensor, crop: int, x_range: tuple[int, int], stride: int):
    """Top-left corners of crops fully inside the fundus with their x in ``x_range``."""
    corners = []
    h, w = mask.shape[-2:]
    for y in range(0, h - crop + 1, stride):
        for x in range(x_range[0], min(x_range[1], w) - crop + 1, stride):
            if bool(mask[0, y : y + crop, x : x + crop].all()):
                corners.append((y, x))
    return corners


def train(
    model: Pix2Pix,
    blurred,
    sharp,
    corners,
    crop: int,
    steps: int,
    batch: int,
    seed: int,
    misregister: int = 0,
    decay: bool = False,
):
    """Plain loop over the model's own training step (no Lightning trainer overhead).

    With ``misregister > 0`` every target crop is shifted by a random whole-pixel offset of up to
    that many pixels along each axis against its input, as pairs of separately acquired images are
    (adjacent sections in BCI, refocused captures in COMI); the test pairs stay aligned.
    """
    rng = np.random.default_rng(seed)
    h, w = sharp.shape[-2:]
    opt_g = model.build_optimizer(model.generator.parameters())
    opt_d = model.build_optimizer(model.discriminator.parameters(), model.optimizer_d_config)
    # pix2pix's "linear" policy with one step as the unit: constant, then linear to 0 over the
    # second half (the papers' 100 + 100 epochs).
    schedulers = [
        lr_policy(opt, "linear", n_epochs=steps // 2, n_epochs_decay=steps - steps // 2)
        for opt in (opt_g, opt_d)
        if decay
    ]
    model.train()
    for _ in range(steps):
        picks = rng.integers(0, len(corners), batch)
        flip = rng.random(batch) < 0.5
        a, b = [], []
        for k, f in zip(picks, flip, strict=True):
            y, x = corners[k]
            pa = blurred[:, y : y + crop, x : x + crop]
            if misregister:
                dy, dx = rng.integers(-misregister, misregister + 1, 2)
                y = int(np.clip(y + dy, 0, h - crop))
                x = int(np.clip(x + dx, 0, w - crop))
            pb = sharp[:, y : y + crop, x : x + crop]
            if f:
                pa, pb = pa.flip(-1), pb.flip(-1)
            a.append(pa)
            b.append(pb)
        a, b = model.to_net(torch.stack(a)), model.to_net(torch.stack(b))
        fake = model.generator(a)
        d = model.discriminator_loss(a, b, fake)
        opt_d.zero_grad(set_to_none=True)
        d["d_loss"].backward()
        opt_d.step()
        for p in model.discriminator.parameters():
            p.requires_grad_(False)
        g = model.generator_loss(a, b, fake)
        opt_g.zero_grad(set_to_none=True)
        g["g_loss"].backward()
        opt_g.step()
        for p in model.discriminator.parameters():
            p.requires_grad_(True)
        for scheduler in schedulers:
            scheduler.step()


def scores(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {
        "psnr": float(psnr(x.clamp(0, 1), y, data_range=1.0).mean()),
        "ssim": float(ssim(x.clamp(0, 1), y, data_range=1.0).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--radius", type=float, default=3.0)
    parser.add_argument(
        "--generator",
        choices=("unet", "resnet_residual"),
        default="resnet_residual",
        help="a ResNet-6 with a global residual (COMI-style, no final tanh, starting as the "
        "identity), or pix2pix's UNet",
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam rate of both nets")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one training run per seed and model; the mean and spread are reported",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODELS),
        default=["pix2pix", "pyramid_pix2pix", "pix2pix_l1_25"],
        help="reconstruction terms to compare (pix2pix and pyramid_pix2pix are required for the "
        "paired difference and the figure)",
    )
    parser.add_argument(
        "--constant-lr",
        dest="decay",
        action="store_false",
        help="keep both learning rates constant (default: pix2pix's 'linear' policy, constant "
        "for the first half of the steps, then linear to 0)",
    )
    parser.add_argument(
        "--misregister",
        type=int,
        default=0,
        help="shift each training target by up to this many pixels against its input",
    )
    parser.add_argument(
        "--contrast",
        action="store_true",
        help="translate contrast as well: the target is 1 - sharp**0.7 (inverted, gamma 0.7), so "
        "low frequencies change too, as in a stain or MR-contrast translation",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/translation_retina_cpu.json")
    )
    parser.add_argument("--figure", default=str(ROOT / "docs/images/translation_retina.png"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    blurred, sharp, mask = retina_pair(args.radius)
    if args.contrast:
        sharp = 1.0 - sharp.pow(0.7)
    width = sharp.shape[-1]
    split = int(0.7 * width)
    train_corners = crops_inside(mask, args.crop, (0, split), 8)
    test_corners = crops_inside(mask, args.crop, (split, width), args.crop)
    test_a = torch.stack(
        [blurred[:, y : y + args.crop, x : x + args.crop] for y, x in test_corners]
    )
    test_b = torch.stack([sharp[:, y : y + args.crop, x : x + args.crop] for y, x in test_corners])

    generator = {"_target_": "medgen.nets.UnetGenerator", "num_downs": 6, "ngf": 16}
    if args.generator == "resnet_residual":
        generator = {
            "_target_": "medgen.nets.ResnetGenerator",
            "ngf": 16,
            "n_blocks": 6,
            "norm": "batch",
            "global_residual": True,
            "final_act": None,
        }
    discriminator = {"_target_": "medgen.nets.NLayerDiscriminator", "ndf": 16, "n_layers": 2}
    optimizer = {"_target_": "torch.optim.Adam", "lr": args.lr, "betas": [0.5, 0.999]}
    results: dict = {
        "config": {
            **vars(args),
            "train_crops": len(train_corners),
            "test_crops": len(test_corners),
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "blurred_input": scores(test_a, test_b),
    }
    outputs: dict[str, torch.Tensor] = {}
    for name in args.models:
        kwargs = MODELS[name]
        runs = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = Pix2Pix(
                generator=generator,
                discriminator=discriminator,
                optimizer_g=optimizer,
                **kwargs,
            ).to(args.device)
            if args.generator == "resnet_residual":
                # Zero the last convolution, so that the residual generator starts as the
                # identity (output = input) and training only has to learn the correction.
                torch.nn.init.zeros_(model.generator.head.weight)
                torch.nn.init.zeros_(model.generator.head.bias)
            start = time.perf_counter()
            train(
                model,
                blurred,
                sharp,
                train_corners,
                args.crop,
                args.steps,
                args.batch,
                seed,
                args.misregister,
                args.decay,
            )
            seconds = time.perf_counter() - start
            out = model.translate(test_a.to(args.device), tile=None).cpu()
            if seed == args.seeds[0]:
                outputs[name] = out
            runs.append({"seed": seed, **scores(out, test_b), "train_seconds": round(seconds, 1)})
            print(name, runs[-1], flush=True)
        results[name] = {
            **{
                f"{key}_{stat}": float(fn(torch.tensor([r[key] for r in runs])))
                for key in ("psnr", "ssim")
                for stat, fn in (("mean", torch.mean), ("std", torch.std))
            },
            "runs": runs,
        }
    for name in args.models:
        r = results[name]
        print(
            f"{name}: PSNR {r['psnr_mean']:.2f} +- {r['psnr_std']:.2f} dB, "
            f"SSIM {r['ssim_mean']:.3f} +- {r['ssim_std']:.3f}"
        )
        if name == "pix2pix" or "pix2pix" not in results:
            continue
        # Paired by seed: same initial weights, crops and flips, only the loss differs.
        gain = torch.tensor([x["psnr"] for x in r["runs"]]) - torch.tensor(
            [x["psnr"] for x in results["pix2pix"]["runs"]]
        )
        r["minus_pix2pix_psnr"] = {
            "mean": float(gain.mean()),
            "std": float(gain.std()) if len(gain) > 1 else 0.0,
            "per_seed": [round(float(g), 3) for g in gain],
        }
        print(f"  {name} - pix2pix (paired by seed):", r["minus_pix2pix_psnr"])
    print("blurred input", results["blurred_input"])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not {"pix2pix", "pyramid_pix2pix"} <= set(outputs):
        print("wrote", args.out)
        return
    # Figure: the test crop where pix2pix gains most over the input, four panels side by side.
    gain = ((test_a - test_b).abs().flatten(1).mean(1)) - (
        (outputs["pix2pix"] - test_b).abs().flatten(1).mean(1)
    )
    k = int(gain.argmax())
    gap = torch.ones(1, args.crop, 4)
    panels = [test_a[k], gap, outputs["pix2pix"][k].clamp(0, 1), gap]
    panels += [outputs["pyramid_pix2pix"][k].clamp(0, 1), gap, test_b[k]]
    strip = torch.cat(panels, -1)
    strip = F.interpolate(strip[None], scale_factor=3, mode="nearest")[0]
    write(strip, args.figure, value_range=(0.0, 1.0), bit_depth=8)
    print("wrote", args.out, "and", args.figure)


if __name__ == "__main__":
    main()
