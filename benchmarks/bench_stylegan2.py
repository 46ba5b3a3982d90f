"""StyleGAN2-ADA: ADA on vs off with 100 training images, and seconds per 1000 images, as JSON.

Run:  python benchmarks/bench_stylegan2.py [--device cpu|cuda] [--steps N] [--seeds 0 1 2]
      python benchmarks/bench_stylegan2.py --only speed --device cuda --speed-size 256

Small data (the StyleGAN2-ADA setting): 100 phantom slices at 64², nets half as wide as
``stylegan2_2d``'s (``NETS_SMALL``, so that six runs fit a shared CPU),
the same number of generator steps with ADA on (``p`` adapting toward r_t = 0.6) and off, for each
seed. The feature distance is the MMD² (Gaussian kernel, bandwidth the median distance of the
real features) between 256 held-out real slices (other subjects) and 256 samples of the EMA
generator, in the features of one fixed extractor (``RandomConvFeatures(2, width=16, seed=0)``);
lower is better. The ADA controller adapts ``p`` over ``--ada-kimg`` thousand images (500 in the
paper, whose runs last tens of millions of images; a short CPU run needs a faster controller).

Speed: seconds per 1000 training images (generator + discriminator step, ADA on, regularisation
at its lazy intervals) for 64² (``stylegan2_2d`` nets, batch 16) and 32³ (``stylegan2_3d`` nets,
batch 4), median over timed steps after warm-up.

Writes ``benchmarks/results/stylegan2_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

import medgen
from medgen.data import PhantomDataset
from medgen.features import RandomConvFeatures
from medgen.metrics import mmd_rbf
from medgen.models import StyleGAN2

NETS_2D = {"latent_dim": 128, "w_dim": 128, "channel_base": 2048, "channel_max": 128}
NETS_3D = {"latent_dim": 64, "w_dim": 64, "channel_base": 512, "channel_max": 64}
#: Narrower 64² nets for the small-data comparison, so 6 runs fit a shared CPU.
NETS_SMALL = {"latent_dim": 64, "w_dim": 64, "channel_base": 1024, "channel_max": 64}


def _model(spatial_dims: int, size: int, nets: dict[str, Any], augment: dict | None) -> StyleGAN2:
    gen = {"image_size": size, **nets}
    disc = {
        "image_size": size,
        "channel_base": nets["channel_base"],
        "channel_max": nets["channel_max"],
    }
    return StyleGAN2(generator=gen, discriminator=disc, spatial_dims=spatial_dims, augment=augment)


def _images(spatial_dims: int, size: int, length: int, offset: int) -> torch.Tensor:
    data = PhantomDataset(spatial_dims=spatial_dims, size=size, length=length, offset=offset)
    return torch.stack([data[i]["image"].as_subclass(torch.Tensor) for i in range(length)])


def _trainer(device: str, steps: int, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_steps=2 * steps,  # Lightning counts both optimisers' steps
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def _loader(images: torch.Tensor, batch: int, seed: int) -> DataLoader:
    items = [{"image": x} for x in images]
    return DataLoader(
        items,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def small_data(args: argparse.Namespace) -> dict[str, Any]:
    train = _images(2, 64, 100, 0)
    held_out = _images(2, 64, args.eval_images, 100_000)
    features = RandomConvFeatures(2, width=16, seed=0).to(args.device)

    def feats(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return features((x * 2 - 1).to(args.device)).double().cpu()

    real = feats(held_out)
    sigma = float(torch.pdist(real).median())
    runs = []
    for seed in args.seeds:
        for ada in (False, True):
            L.seed_everything(seed, verbose=False)
            augment = (
                {"p": 0.0, "target": 0.6, "interval": 4, "kimg": args.ada_kimg} if ada else None
            )
            model = _model(2, 64, NETS_SMALL, augment)
            # Several epochs of 100 images: repeat the loader to cover the steps.
            repeats = -(-args.steps * 16 // 96) + 1
            loader = _loader(train.repeat(repeats, 1, 1, 1), 16, seed)
            start = time.perf_counter()
            _trainer(args.device, args.steps).fit(model, loader)
            wall = time.perf_counter() - start
            model = model.to(args.device)
            fake = feats(model.sample(args.eval_images, seed=1000 + seed))
            runs.append(
                {
                    "seed": seed,
                    "ada": ada,
                    "generator_steps": int(model.generator_steps),
                    "final_p": round(model.ada_p, 4),
                    "mmd": mmd_rbf(real, fake, sigma=sigma),
                    "wall_seconds": round(wall, 1),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for ada in (False, True):
        values = [r["mmd"] for r in runs if r["ada"] == ada]
        summary["ada_on" if ada else "ada_off"] = {
            "mmd_mean": statistics.mean(values),
            "mmd_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "mmd_per_seed": values,
        }
    wins = sum(
        on["mmd"] < off["mmd"]
        for on, off in zip(
            [r for r in runs if r["ada"]], [r for r in runs if not r["ada"]], strict=True
        )
    )
    summary["ada_lower_in_seeds"] = f"{wins}/{len(args.seeds)}"
    return {"runs": runs, "summary": summary}


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    cases = [(2, args.speed_size, NETS_2D, 16), (3, 32, NETS_3D, 4)]
    for spatial_dims, size, nets, batch in cases:
        L.seed_everything(0, verbose=False)
        model = _model(spatial_dims, size, nets, {"p": 0.2, "target": 0.6})
        images = _images(spatial_dims, size, batch * 4, 0)
        steps = args.speed_steps
        timer = _StepTimer(warmup=2)
        loader = _loader(images.repeat(-(-steps // 4) + 1, *(1,) * (images.ndim - 1)), batch, 0)
        _trainer(args.device, steps, [timer]).fit(model, loader)
        per_step = statistics.median(timer.times)
        key = f"{size}^{spatial_dims}"
        results[key] = {
            "batch": batch,
            "timed_steps": len(timer.times),
            "median_step_seconds": round(per_step, 4),
            "seconds_per_kimg": round(per_step * 1000 / batch, 1),
            "generator_parameters": sum(p.numel() for p in model.generator.parameters()),
        }
        print(key, json.dumps(results[key]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", choices=["small_data", "speed"], default=None)
    parser.add_argument("--steps", type=int, default=300, help="generator steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ada-kimg", type=float, default=2.0)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--speed-steps", type=int, default=12)
    parser.add_argument("--speed-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (shared CPUs: 1)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    record: dict[str, Any] = {
        "benchmark": "stylegan2",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "medgen": medgen.__version__,
        "settings": {
            "steps": args.steps,
            "seeds": args.seeds,
            "ada_kimg": args.ada_kimg,
            "eval_images": args.eval_images,
            "nets_2d": NETS_2D,
            "nets_small_data": NETS_SMALL,
            "nets_3d": NETS_3D,
        },
    }
    if args.only in (None, "speed"):
        record["speed"] = speed(args)
    if args.only in (None, "small_data"):
        record["small_data"] = small_data(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.only is None else f"_{args.only}"
    path = out / f"stylegan2_{args.device}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
