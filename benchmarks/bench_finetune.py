"""Fine-tuning benchmarks: pretrained-then-fine-tuned vs from scratch; LoRA vs full fine-tuning.

1. VAE (the quickstart architecture, medgen.models.VAE): pretrained on phantom slices
   (medgen.data.PhantomDataset) for ``--pretrain-steps``, then trained for ``--steps`` on real
   MRI: axial slices of the MNI152 T1 template shipped in nilearn (``load_mni152_template(2)``,
   slices 20..79, area-resized to ``--size`` (32) squared, intensities / max), every 4th slice held out for validation.
   The same run from a fresh initialisation is the baseline. Same seed, data order, optimiser
   (AdamW, lr 1e-3), batch 8; validation PSNR (data range 1) of the posterior-mean
   reconstruction, after every ``--eval-every`` steps; ``--seeds`` seeds.
2. 3D diffusion UNet (medgen.nets.DiffusionUNet, 3D): trainable parameters of full fine-tuning vs
   LoRA rank 8 (medgen.finetune.add_lora on every convolution, linear and attention projection)
   at the ldm_3d experiment's configuration; one training step's memory: bytes saved for backward
   (saved_tensors_hooks, deterministic) + gradients + Adam state; and quality: a small UNet
   pretrained on 16^3 phantom volumes (epsilon prediction, linear betas 1e-4..0.02, 1000 steps),
   then fine-tuned full vs LoRA for ``--unet-steps`` on 16^3 crops of the (2x downsampled) MNI volume,
   held-out denoising loss at fixed (t, noise) pairs, ``--seeds`` seeds.

Run:  python benchmarks/bench_finetune.py [--size 32] [--steps 100] [--pretrain-steps 200]
      [--unet-steps 80] [--unet-pretrain-steps 150] [--seeds 3]
Writes benchmarks/results/finetune_cpu.json and prints markdown tables; ``--part vae|lora`` runs
one part (both can run in parallel) and merges its results into the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medgen.data import PhantomDataset
from medgen.finetune import add_lora, init_from
from medgen.metrics.pairwise import psnr
from medgen.models import VAE
from medgen.nets import DiffusionUNet

VAE_NET = dict(
    channels=[8, 16, 32], latent_channels=4, latent_dim=None, norm_num_groups=4, init_logvar=-4.0
)


def unet_config(channels, attention, heads, blocks, groups) -> dict:
    """DiffusionUNet keyword arguments."""
    return dict(
        channels=channels,
        attention_levels=attention,
        num_head_channels=heads,
        num_res_blocks=blocks,
        norm_num_groups=groups,
    )


LDM_UNET = unet_config([32, 64, 64], [False, False, True], 32, 1, 8)  # the ldm_3d experiment's
BRAIN_LDM_UNET = unet_config([256, 512, 768], [False, True, True], 64, 2, 32)  # MONAI zoo size
SMALL_UNET = unet_config([16, 32, 32], [False, False, True], 16, 1, 8)


def mni_volume() -> torch.Tensor:
    from nilearn.datasets import load_mni152_template

    volume = np.asarray(load_mni152_template(resolution=2).get_fdata(), dtype=np.float32)
    return torch.from_numpy(volume / volume.max())


def mni_slices(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    vol = mni_volume()[:, :, 20:80].permute(2, 1, 0)[:, None]  # (60, 1, 109, 91)
    slices = F.interpolate(vol, size=(size, size), mode="area").clamp(0, 1)
    val = torch.arange(len(slices)) % 4 == 2
    return slices[~val].contiguous(), slices[val].contiguous()


def phantom_slices(n: int, size: int) -> torch.Tensor:
    data = PhantomDataset(spatial_dims=2, size=size, length=n, seed=0)
    return torch.stack([torch.as_tensor(data[i]["image"]) for i in range(n)]).float()


def make_vae() -> VAE:
    return VAE(spatial_dims=2, beta=0.01, kl_warmup_steps=0, net=dict(in_channels=1, **VAE_NET))


def train_vae(model, data, steps, seed, val=None, eval_every=0, lr=1e-3):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(data), (8,), generator=gen)
        loss = model.loss(data[idx], step=step)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is not None and eval_every and (step % eval_every == 0 or step == steps):
            curve.append((step, vae_psnr(model, val)))
            model.train()
    return curve


@torch.no_grad()
def vae_psnr(model, val) -> float:
    model.eval()
    recon = model.reconstruct(val).clamp(0, 1)
    return float(psnr(recon, val, data_range=1.0).mean())


def bench_vae(args) -> dict:
    train, val = mni_slices(args.size)
    torch.manual_seed(0)
    pre = make_vae()
    t0 = time.perf_counter()
    train_vae(pre, phantom_slices(256, args.size), args.pretrain_steps, seed=0)
    pretrain_s = time.perf_counter() - t0
    folder = Path(args.workdir) / "vae_phantoms"
    pre.save_pretrained(folder)
    runs = []
    for seed in range(args.seeds):
        row = {"seed": seed}
        for kind in ("scratch", "finetuned"):
            torch.manual_seed(seed)
            model = make_vae()
            if kind == "finetuned":
                init_from(model, folder, verbose=False)
            row[f"{kind}_psnr_step0"] = vae_psnr(model, val)
            row[kind] = train_vae(model, train, args.steps, seed, val, args.eval_every)
        runs.append(row)
        print(
            f"vae seed {seed}: scratch {row['scratch'][-1][1]:.2f} dB, "
            f"fine-tuned {row['finetuned'][-1][1]:.2f} dB",
            flush=True,
        )
    final = {k: [r[k][-1][1] for r in runs] for k in ("scratch", "finetuned")}
    return {
        "data": f"MNI152 T1 template (nilearn, 2 mm) axial slices 20..79 at {args.size}^2; "
        f"{len(train)} train / {len(val)} validation slices",
        "pretrain": f"{args.pretrain_steps} steps on 256 phantom slices ({pretrain_s:.0f} s)",
        "steps": args.steps,
        "runs": runs,
        "final_psnr_mean": {k: statistics.mean(v) for k, v in final.items()},
        "final_psnr_std": {k: statistics.pstdev(v) for k, v in final.items()},
        "finetuned_better_every_seed": all(
            f > s for f, s in zip(final["finetuned"], final["scratch"], strict=True)
        ),
    }


# ----------------------------------------------------------------------------- diffusion / LoRA
def betas_alpha_bar(n: int = 1000) -> torch.Tensor:
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, n), 0)


def eps_loss(net, x0, t, noise, alpha_bar):
    ab = alpha_bar[t].view(-1, *([1] * (x0.ndim - 1)))
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    return F.mse_loss(net(xt, t), noise)


def step_memory(net, x, t, noise, alpha_bar) -> dict:
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        loss = eps_loss(net, x, t, noise, alpha_bar)
    loss.backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    net.zero_grad(set_to_none=True)
    return {
        "saved_for_backward_mb": sum(saved) / 2**20,
        "gradients_mb": param_bytes / 2**20,
        "adam_state_mb": 2 * param_bytes / 2**20,
        "total_mb": (sum(saved) + 3 * param_bytes) / 2**20,
    }


def counts(net) -> dict:
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / total}


def crops(volume: torch.Tensor, n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    out = []
    for _ in range(n):
        corner = [int(torch.randint(s - size + 1, (1,), generator=gen)) for s in volume.shape]
        sl = tuple(slice(c, c + size) for c in corner)
        out.append(volume[sl])
    return torch.stack(out)[:, None] * 2 - 1


def train_unet(net, sample, steps, seed, alpha_bar, lr):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0
    )
    net.train()
    for _ in range(steps):
        x = sample(gen)
        t = torch.randint(len(alpha_bar), (len(x),), generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        loss = eps_loss(net, x, t, noise, alpha_bar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def val_loss(net, x, t, noise, alpha_bar) -> float:
    net.eval()
    return float(eps_loss(net, x, t, noise, alpha_bar))


def bench_lora(args) -> dict:
    alpha_bar = betas_alpha_bar()
    out: dict = {}
    # parameter counts and step memory at the ldm_3d UNet configuration (4 latent channels, 16^3)
    torch.manual_seed(0)
    full = DiffusionUNet(3, 4, 4, **LDM_UNET)
    x = torch.randn(2, 4, 16, 16, 16)
    t = torch.tensor([10, 500])
    noise = torch.randn_like(x)
    out["ldm_3d_unet"] = {
        "full": counts(full),
        "full_step": step_memory(full, x, t, noise, alpha_bar),
    }
    lora = DiffusionUNet(3, 4, 4, **LDM_UNET)
    layers = add_lora(lora, r=8, alpha=8)
    out["ldm_3d_unet"].update(
        lora_layers=len(layers),
        lora=counts(lora),
        lora_step=step_memory(lora, x, t, noise, alpha_bar),
    )
    print("ldm_3d UNet:", out["ldm_3d_unet"]["lora"], flush=True)
    # the fraction is about r / width: counts at MONAI's brain-LDM UNet size (parameters only)
    big = DiffusionUNet(3, 3, 3, **BRAIN_LDM_UNET)
    big_full = counts(big)
    add_lora(big, r=8, alpha=8)
    out["brain_ldm_size_unet"] = {"config": BRAIN_LDM_UNET, "full": big_full, "lora": counts(big)}
    del big
    # quality: small 1-channel UNet pretrained on phantoms, fine-tuned on MNI crops
    phantoms = PhantomDataset(spatial_dims=3, size=16, length=64, seed=0)
    ph = torch.stack([torch.as_tensor(phantoms[i]["image"]) for i in range(64)]).float() * 2 - 1
    vol = F.avg_pool3d(mni_volume()[None, None], 2)[0, 0]  # (49, 58, 47)
    train_vol, val_vol = vol[:, :40], vol[:, 40:]
    gen = torch.Generator().manual_seed(123)
    val_x = crops(val_vol, 16, 16, gen)
    val_t = torch.randint(1000, (16,), generator=gen)
    val_noise = torch.randn(val_x.shape, generator=gen)
    torch.manual_seed(0)
    base = DiffusionUNet(3, 1, 1, **SMALL_UNET)
    t0 = time.perf_counter()
    train_unet(
        base,
        lambda g: ph[torch.randint(64, (4,), generator=g)],
        args.unet_pretrain_steps,
        0,
        alpha_bar,
        1e-3,
    )
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    rows = []
    for seed in range(args.seeds):
        row = {"seed": seed}
        for kind in ("pretrained_only", "full", "lora_r8"):
            net = DiffusionUNet(3, 1, 1, **SMALL_UNET)
            net.load_state_dict(base_state)
            if kind == "lora_r8":
                add_lora(net, r=8, alpha=8)
            if kind != "pretrained_only":
                lr = 1e-3 if kind == "lora_r8" else 2e-4
                train_unet(
                    net, lambda g: crops(train_vol, 4, 16, g), args.unet_steps, seed, alpha_bar, lr
                )
            row[kind] = val_loss(net, val_x, val_t, val_noise, alpha_bar)
            if kind == "lora_r8":
                row["lora_fraction"] = counts(net)["fraction"]
        rows.append(row)
        print(f"unet seed {seed}: {row}", flush=True)
    out["quality"] = {
        "pretrain": f"{args.unet_pretrain_steps} steps on 64 phantom volumes 16^3 "
        f"({time.perf_counter() - t0:.0f} s incl. fine-tuning)",
        "steps": args.unet_steps,
        "lr": {"full": 2e-4, "lora_r8": 1e-3},
        "runs": rows,
        "val_loss_mean": {
            k: statistics.mean(r[k] for r in rows) for k in ("pretrained_only", "full", "lora_r8")
        },
        "val_loss_std": {
            k: statistics.pstdev(r[k] for r in rows) for k in ("pretrained_only", "full", "lora_r8")
        },
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="VAE image size")
    parser.add_argument("--steps", type=int, default=100, help="VAE fine-tuning steps")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--unet-steps", type=int, default=80)
    parser.add_argument("--unet-pretrain-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/medgen_bench_finetune")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "finetune_cpu.json")
    )
    parser.add_argument(
        "--part",
        choices=("all", "vae", "lora"),
        default="all",
        help="run one part; its results are merged into --out (the parts can run in parallel)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    part: dict = {}
    if args.part in ("all", "vae"):
        part["vae"] = bench_vae(args)
    if args.part in ("all", "lora"):
        part["lora_3d_unet"] = bench_lora(args)
    part[f"wall_s_{args.part}"] = time.perf_counter() - start
    out = Path(args.out)
    lock = out.with_suffix(".lock")
    with open(lock, "w") as handle:  # the parts may finish together
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX)
        result = json.loads(out.read_text()) if out.is_file() and args.part != "all" else {}
        result.update(
            machine=f"{platform.processor() or platform.machine()}, {args.threads} threads",
            torch=torch.__version__,
            **part,
        )
        out.write_text(json.dumps(result, indent=1))
    lock.unlink(missing_ok=True)
    if "vae" in part:
        v = part["vae"]
        print(f"\n| VAE on MNI slices | val PSNR after {v['steps']} steps (mean ± std) |")
        print("|---|---|")
        for k in ("scratch", "finetuned"):
            print(f"| {k} | {v['final_psnr_mean'][k]:.2f} ± {v['final_psnr_std'][k]:.2f} dB |")
    if "lora_3d_unet" in part:
        q = part["lora_3d_unet"]
        print(json.dumps(q["ldm_3d_unet"], indent=1))
        print(json.dumps(q["quality"]["val_loss_mean"], indent=1))


if __name__ == "__main__":
    main()
