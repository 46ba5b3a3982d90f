"""Diffusion samplers side by side: exact accuracy on a toy, then a (tiny) trained model.

    python examples/diffusion_samplers.py [--steps 200] [--size 16] [--ddpm-steps 1000] [--fast-steps 25]

1. On Gaussian data the exact denoiser and the exact end point of the probability-flow ODE are
   known in closed form, so the error of each sampler against the exact solution shows its order:
   DDIM (first order) against DPM-Solver++(2M) (second order), at 5 to 100 steps.
2. A small class-conditional diffusion model (T1 vs T2 contrast) is trained on phantom slices for
   a few steps, then sampled with DDPM, DDIM and DPM-Solver++, with classifier-free guidance, and
   as an inpainting of the centre of a real slice. The defaults are tiny (16x16, 200 steps, under a minute on a CPU); the
   samples are blobs at that budget: see `medgen-train experiment=ddpm_2d` for recognisable heads.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from medgen.data import PhantomDataset
from medgen.diffusion import NoiseSchedule, ddim_sample, dpmpp_2m_sample, eps_from_x0
from medgen.models import Diffusion


def toy_errors() -> None:
    """Max error against the exact ODE solution for x0 ~ N(0.5, 0.3^2)."""
    mu, std = 0.5, 0.3
    schedule = NoiseSchedule("cosine", 1000)

    def denoise(x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = float(schedule.alpha_bar(t).double())
        x0 = mu + std**2 * math.sqrt(a) / (a * std**2 + 1 - a) * (x - math.sqrt(a) * mu)
        return x0, eps_from_x0(x, x0, torch.tensor(a, dtype=x.dtype))

    z = torch.randn(2048, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = float(schedule.alpha_bar(999).double())
    start = math.sqrt(a) * mu + math.sqrt(a * std**2 + 1 - a) * z
    exact = mu + std * z  # the probability-flow ODE keeps z fixed for Gaussian data
    print("toy: max error against the exact ODE solution")
    for steps in (5, 10, 25, 50, 100):
        e_ddim = float((ddim_sample(denoise, schedule, start, steps) - exact).abs().max())
        e_dpm = float((dpmpp_2m_sample(denoise, schedule, start, steps) - exact).abs().max())
        print(f"  steps {steps:3d}: ddim {e_ddim:.2e}  dpmpp_2m {e_dpm:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the DDPM sampler")
    parser.add_argument("--fast-steps", type=int, default=25, help="steps of the fast samplers")
    args = parser.parse_args()
    torch.manual_seed(0)
    toy_errors()

    # Two classes: the same 32 subjects as T1- and as T2-like contrast.
    images = torch.stack(
        [
            d["image"]
            for contrast in ("t1", "t2")
            for d in PhantomDataset(spatial_dims=2, size=args.size, length=32, contrast=contrast)
        ]
    )
    labels = torch.arange(64) // 32  # 0: T1, 1: T2
    model = Diffusion(
        net={
            "channels": [16, 32],
            "num_res_blocks": 1,
            "attention_levels": [False, True],
            "num_head_channels": 16,
            "norm_num_groups": 8,
        },
        class_key="label",
        num_classes=2,
        cond_drop_prob=0.2,  # trains the unconditional model too, for guidance
        schedule={"kind": "cosine", "num_train_timesteps": 1000},
        prediction="v",
        min_snr_gamma=5.0,
        sample_size=[args.size, args.size],
    )
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=2e-3)
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (16,))
        loss = model.training_step({"image": images[idx], "label": labels[idx]}, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s, loss {loss:.3f}")

    model.eval()
    fast = args.fast_steps
    for sampler, steps in (("ddpm", args.ddpm_steps), ("ddim", fast), ("dpmpp_2m", fast)):
        start = time.perf_counter()
        out = model.sample(8, sampler=sampler, steps=steps, seed=0, condition={"class_labels": 1})
        seconds = time.perf_counter() - start
        print(f"{sampler:9s} {steps:4d} steps: {tuple(out.shape)} in {seconds:.2f} s")
    guided = model.sample(
        8, steps=fast, sampler="dpmpp_2m", seed=0, guidance=3.0, condition={"class_labels": 1}
    )
    print(f"guidance 3: {tuple(guided.shape)}, mean intensity {float(guided.mean()):.3f}")

    mask = torch.zeros(1, 1, args.size, args.size)
    mask[..., args.size // 4 : 3 * args.size // 4, args.size // 4 : 3 * args.size // 4] = 1
    filled = model.sample(
        4,
        steps=fast,
        sampler="ddim",
        seed=0,
        known=images[:1],
        mask=mask,
        resample=2,
        condition={"class_labels": 0},
    )
    kept = float((filled - images[:1]).abs()[(mask == 0).expand_as(filled)].max())
    print(f"inpainting: outside the mask max |out - known| = {kept:.1e}")


if __name__ == "__main__":
    main()
