"""Speed against quality of the diffusion samplers: seconds per sample vs steps, and a quality proxy.

Run:  python benchmarks/bench_sampling.py [--device cpu|cuda] [--ddpm-2d PATH] [--v-2d PATH]
      [--flow-2d PATH] [--ddpm-3d PATH] [--epochs-2d N] [--epochs-3d N] [--num-samples 64] [--table]

Trains (or loads, from a ``medgen-train`` run's ``model`` folder or checkpoint) a small 2D DDPM on
32x32 phantom slices (experiment ``ddpm_2d``), the same net with v-prediction and as a rectified
flow, and a tiny 3D
DDPM on 16^3 phantom volumes (experiment ``ddpm_3d``, shrunk). Then, for every sampler and number
of steps, it draws ``--num-samples`` samples from one seed in one batch and records

- seconds per sample (wall time of the batch / number of samples) and net evaluations;
- the quality proxy: unbiased RBF-MMD^2 between fixed random-conv features
  (:class:`medgen.metrics.RandomConvFeatures`, the GANs' ``val/mmd``) of the samples and of
  held-out phantoms (subjects seen neither in training nor in validation), with the bandwidth from
  the held-out features; and the same MMD between training phantoms and the held-out ones, the
  value of a perfect model at this sample size (the proxy's floor).

Writes ``benchmarks/results/sampling_<device>.json``; ``--table`` prints the markdown table of
``docs/performance.md``. Timing is of whole sampling runs on a possibly shared machine: the JSON
records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import medgen
from medgen.data import PhantomDataset
from medgen.metrics import RandomConvFeatures, mmd_rbf

# (sampler, steps, eta): DDIM with eta = 1 is the strided DDPM (same posterior variance).
VP_SAMPLERS = [("ddpm", 1000, None)] + [
    (s, n, eta)
    for s, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", None))
    for n in (10, 25, 50, 100)
]
FLOW_SAMPLERS = [("euler", n, None) for n in (10, 25, 50)] + [
    ("heun", n, None) for n in (5, 13, 25)
]
VP_SAMPLERS_3D = [("ddpm", 1000, None)] + [
    (s, n, eta)
    for s, eta in (("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", None))
    for n in (10, 25, 50)
]


def _train(overrides: list[str], out: Path) -> Path:
    cfg = medgen.compose(
        "train",
        [
            f"paths.output_dir={out}",
            "~callbacks.progress_bar",
            "~callbacks.image_logger",
            "~callbacks.lr_monitor",
            "logger=none",
            "num_samples=0",
            *overrides,
        ],
    )
    start = time.perf_counter()
    result = medgen.train(cfg)
    print(f"trained {overrides[0]} in {time.perf_counter() - start:.0f} s", flush=True)
    return Path(result["model_dir"])


def _phantoms(spatial_dims: int, size: int, count: int, offset: int) -> torch.Tensor:
    data = PhantomDataset(spatial_dims=spatial_dims, size=size, length=count, offset=offset)
    return torch.stack([d["image"] for d in data])


def _evaluate(model, samplers, num_samples: int, device: str, spatial_dims: int, size: int):
    features = RandomConvFeatures(spatial_dims, width=16)
    held_out = _phantoms(spatial_dims, size, num_samples, offset=300_000)
    train_like = _phantoms(spatial_dims, size, num_samples, offset=0)

    def feats(x: torch.Tensor) -> torch.Tensor:
        return features(model.to_net(x.float())).double()

    f_ref = feats(held_out)
    sigma = float(torch.pdist(f_ref).median())
    floor = mmd_rbf(feats(train_like), f_ref, sigma=sigma)
    model = model.to(device)
    rows = []
    for name, steps, eta in samplers:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        samples = model.sample(
            num_samples, sampler=name, steps=steps, eta=eta, seed=0, batch_size=num_samples
        )
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        nfe = medgen.diffusion.get_sampler(name).evaluations(steps)
        mmd = mmd_rbf(feats(samples), f_ref, sigma=sigma)
        rows.append(
            {
                "sampler": name if eta is None else f"{name} eta={eta:g}",
                "steps": steps,
                "net_evaluations": nfe,
                "seconds": round(seconds, 3),
                "seconds_per_sample": round(seconds / num_samples, 5),
                "mmd": round(mmd, 6),
            }
        )
        print(f"  {name:9s} {eta} {steps:5d} steps  {seconds:8.2f} s  mmd {mmd:.5f}", flush=True)
    return {"floor_mmd": round(floor, 6), "sigma": sigma, "results": rows}


def _relative(section: dict) -> None:
    base = next((r for r in section["results"] if r["sampler"] == "ddpm"), None)
    if base is None:
        return
    for row in section["results"]:
        row["speedup_vs_ddpm1000"] = round(base["seconds"] / row["seconds"], 1)
        row["mmd_vs_ddpm1000"] = round(row["mmd"] / base["mmd"], 3) if base["mmd"] > 0 else None


def table(record: dict) -> str:
    """The markdown table of ``docs/performance.md``."""
    lines = []
    for key, title in (
        ("2d", "2D, 32x32"),
        ("2d_v", "2D v-prediction, 32x32"),
        ("flow_2d", "2D flow, 32x32"),
        ("3d", "3D, 16^3"),
    ):
        if "results" not in record.get(key, {}):
            continue
        section = record[key]
        lines += [
            f"**{title}** ({section['num_samples']} samples; MMD floor (train vs held-out "
            f"phantoms) {section['floor_mmd']:.4f}; training {section['train']}):",
            "",
            "| sampler | steps | net evals | s / sample | speed-up vs DDPM-1000 | MMD | MMD / DDPM-1000 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in section["results"]:
            lines.append(
                f"| {r['sampler']} | {r['steps']} | {r['net_evaluations']} | "
                f"{r['seconds_per_sample']:.4f} | {r.get('speedup_vs_ddpm1000', '-')} | "
                f"{r['mmd']:.4f} | {r.get('mmd_vs_ddpm1000', '-')} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--ddpm-2d", default=None, help="trained ddpm_2d model (else trains one)")
    parser.add_argument(
        "--v-2d", default=None, help="trained 2D v-prediction model (else trains one)"
    )
    parser.add_argument("--flow-2d", default=None, help="trained 2D flow model (else trains one)")
    parser.add_argument("--ddpm-3d", default=None, help="trained tiny 3D model (else trains one)")
    parser.add_argument("--epochs-2d", type=int, default=None, help="default: the experiment's")
    parser.add_argument("--epochs-3d", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--num-samples-3d", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["2d", "2d_v", "flow_2d", "3d"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--table", action="store_true", help="print the docs table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    trainer = f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}"
    epochs_2d = [] if args.epochs_2d is None else [f"trainer.max_epochs={args.epochs_2d}"]
    record: dict = {
        "benchmark": "sampling",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "medgen": medgen.__version__,
        "loadavg_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plans = {
            "2d": (
                args.ddpm_2d,
                ["experiment=ddpm_2d", trainer, *epochs_2d],
                VP_SAMPLERS,
                2,
                32,
                args.num_samples,
            ),
            "2d_v": (
                args.v_2d,
                ["experiment=ddpm_2d", trainer, *epochs_2d, "model.prediction=v"],
                VP_SAMPLERS,
                2,
                32,
                args.num_samples,
            ),
            "flow_2d": (
                args.flow_2d,
                [
                    "experiment=ddpm_2d",
                    trainer,
                    *epochs_2d,
                    "model.prediction=flow",
                    "model.min_snr_gamma=null",
                    "model.sampler.name=euler",
                    "model.val_sampler.name=euler",
                ],
                FLOW_SAMPLERS,
                2,
                32,
                args.num_samples,
            ),
            "3d": (
                args.ddpm_3d,
                [
                    "experiment=ddpm_3d",
                    trainer,
                    f"trainer.max_epochs={args.epochs_3d}",
                    "data.train.size=16",
                    "model.net.channels=[16,32]",
                    "model.val_sampler.steps=5",
                    "model.net.attention_levels=[false,true]",
                    "model.net.num_head_channels=16",
                    "trainer.check_val_every_n_epoch=5",
                ],
                VP_SAMPLERS_3D,
                3,
                16,
                args.num_samples_3d,
            ),
        }
        for key, (path, overrides, samplers, dims, size, n) in plans.items():
            if key in args.skip:
                continue
            print(f"{key}:", flush=True)
            start = time.perf_counter()
            trained = f"loaded {path}"
            if path is None:
                path = _train(overrides, tmp / key)
                trained = f"{overrides[0]}, {round(time.perf_counter() - start)} s"
            model = medgen.load(path)
            section = _evaluate(model, samplers, n, args.device, dims, size)
            section.update({"num_samples": n, "image_size": size, "train": trained})
            _relative(section)
            record[key] = section
    record["loadavg_end"] = list(os.getloadavg())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampling_{args.device}.json"
    if path.exists():  # sections skipped in this run keep their earlier results
        earlier = json.loads(path.read_text())
        for key in args.skip:
            if key in earlier:
                record[key] = {**earlier[key], "from_earlier_run": True}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    if args.table:
        print(table(record))


if __name__ == "__main__":
    main()
