"""Steps of ``benchmarks/gpu_check.sh``: one GPU check of medgen, each step writing one JSON file.

Steps (``python benchmarks/gpu_check.py STEP --device cuda|cpu --output DIR [--dry-run]``):

* ``triton``: the fused Triton GroupNorm + scale/shift + SiLU kernels against the float64 PyTorch
  reference, values and gradients, fp32 / bf16 / fp16 (the cases of
  ``tests/test_triton_groupnorm.py`` plus UNet-sized ones on a GPU), and on a GPU the time of one
  forward + backward: Triton, ATen reference, eager composite. On a CPU (dry run) the kernels run
  under Triton's interpreter (``TRITON_INTERPRET=1``, set by the shell script).
* ``nets``: ``bench_nets.py --precision bf16`` (ours against MONAI: time, saved / peak activation
  memory, ``cuda_peak_bytes`` on a GPU), eager and, on a GPU, compiled.
* ``train``: a few bf16 training steps of every experiment through
  :func:`medgen.runs.memory.estimate_memory` (peak memory, steps/s); latent diffusion gets a
  random-weight stage-1 autoencoder of its first-stage experiment.
* ``presets``: every 3D experiment with ``hardware=gpuNN`` (by default the largest preset the
  device holds; ``--presets`` for others): measured peak against the preset's memory.
* ``decode``: ``bench_autoencoders.py`` at 256^3: whole and tiled (layer by layer; blended with
  per-tile statistics) decoding, peak memory and seam error.
* ``estimate`` (not in the shell script; CPU, minutes): the estimates behind the table of
  ``docs/scaling.md``: each 3D experiment's training step measured at two small volume sizes,
  scaled to the presets' sizes.

``--dry-run`` runs every step at its smallest setting on the CPU (seconds): tiny sizes, one
experiment, no compilation. A step exits non-zero when anything in it failed; what ran is in its
JSON either way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

EXPERIMENTS = sorted(p.stem for p in (ROOT / "medgen" / "configs" / "experiment").glob("*.yaml"))
EXPERIMENTS_3D = [
    "ddpm_3d",
    "rflow_3d",
    "ldm_3d",
    "medical_diffusion",
    "vae_3d",
    "autoencoder_kl_3d",
    "vqgan_3d",
    "pix2pix_3d",
]
#: Latent diffusion experiment -> the experiment that trains its autoencoder.
STAGE_ONE = {"ldm_3d": "autoencoder_kl_3d", "medical_diffusion": "vqgan_3d"}
#: Config keys of each 3D experiment's gradient-checkpointing flags.
CHECKPOINTING = {
    "ddpm_3d": ["model.net"],
    "rflow_3d": ["model.net"],
    "ldm_3d": ["model.net"],
    "medical_diffusion": ["model.net"],
    "vae_3d": ["model.net"],
    "autoencoder_kl_3d": ["model.net", "model.discriminator"],
    "vqgan_3d": ["model.net", "model.discriminator", "model.slice_discriminator"],
    "pix2pix_3d": ["model.generator", "model.discriminator"],
}
#: Adversarial families start their discriminator late; memory is measured with it running.
ADVERSARIAL_START = {
    "autoencoder_kl_3d": "model.adv_start_step=0",
    "vqgan_3d": "model.adv_start_step=0",
}
PRESETS = {"gpu16": 16, "gpu24": 24, "gpu40": 40, "gpu80": 80}
GIB = 2**30


# --------------------------------------------------------------------------------- helpers
def environment(device: str) -> dict[str, Any]:
    """Versions and device name for every JSON record."""
    import torch

    import medgen

    return {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "medgen": medgen.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` (through a temporary file, so a reader never sees half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


@contextlib.contextmanager
def argv(args: list[str]) -> Iterator[None]:
    """Run a benchmark's ``main()`` with ``args`` as its command line."""
    saved = sys.argv
    sys.argv = [saved[0], *args]
    try:
        yield
    finally:
        sys.argv = saved


def quiet_lightning() -> None:
    """Fewer banners from Lightning in the logs."""
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def stage_one(experiment: str, workdir: Path, overrides: list[str]) -> list[str]:
    """Overrides giving a latent experiment a random-weight autoencoder of its first stage.

    Args:
        experiment: ``ldm_3d`` or ``medical_diffusion`` (others get ``[]``).
        workdir: Where the exported autoencoder goes.
        overrides: The run's data overrides, applied to the stage-1 config too.
    """
    import medgen
    from medgen.utils.instantiate import instantiate, to_plain

    first = STAGE_ONE.get(experiment)
    if first is None:
        return []
    data = [o for o in overrides if o.startswith(("data.", "seed="))]
    cfg = medgen.compose("train", [f"experiment={first}", f"paths.output_dir={workdir}", *data])
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    folder = workdir / f"{first}_random"
    model.save_pretrained(folder)
    return [f"model.autoencoder={folder}"]


def checkpointing_overrides(experiment: str, on: bool) -> list[str]:
    """Overrides turning every gradient-checkpointing flag of ``experiment`` on or off."""
    return [
        f"++{key}.gradient_checkpointing={str(on).lower()}" for key in CHECKPOINTING[experiment]
    ]


def run_estimate(
    experiment: str,
    overrides: list[str],
    workdir: Path,
    accelerator: str,
    warmup: int,
    steps: int,
) -> dict[str, Any]:
    """Compose ``experiment`` with ``overrides`` and measure one training step."""
    import medgen
    from medgen.runs.memory import estimate_memory

    base = [f"experiment={experiment}", f"paths.output_dir={workdir / experiment}", *overrides]
    extra = stage_one(experiment, workdir, base)
    cfg = medgen.compose("train", [*base, *extra])
    result = estimate_memory(cfg, warmup=warmup, steps=steps, accelerator=accelerator)
    result["overrides"] = [*base[1:], *extra]
    return result


def _summary(r: dict[str, Any]) -> str:
    return f"peak {r['peak_bytes'] / GIB:.3f} GiB, {r['steps_per_s']:.2f} steps/s"


# ----------------------------------------------------------------------------------- steps
def step_triton(args: argparse.Namespace) -> dict[str, Any]:
    """Fused GroupNorm + SiLU (Triton) against the float64 reference, values and gradients."""
    import torch
    import torch.nn.functional as F

    spec = importlib.util.spec_from_file_location(
        "medgen_test_triton_groupnorm", ROOT / "tests" / "test_triton_groupnorm.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "on a CPU the Triton kernels need TRITON_INTERPRET=1 (set before import)"
        )
    if args.device == "cuda" and not args.dry_run:
        # UNet-sized inputs: several blocks per row, split reductions, channels of real nets.
        module.CASES += [
            ("3d_unet_fp32", (2, 64, 32, 32, 32), 32, "wb", True, True, "silu", torch.float32),
            ("3d_unet_bf16", (2, 64, 32, 32, 32), 32, "wb", True, True, "silu", torch.bfloat16),
            ("2d_wide_bf16", (4, 128, 64, 64), 32, "wb", False, False, "silu", torch.bfloat16),
        ]
    errors = module.run_cases(args.device)  # asserts every error is within tolerance
    record: dict[str, Any] = {
        "errors": errors,
        "tolerance": {str(k).removeprefix("torch."): v for k, v in module.TOL.items()},
        "cases": [
            {"name": c[0], "shape": list(c[1]), "groups": c[2], "dtype": str(c[7])}
            for c in module.CASES
        ],
        "passed": True,
    }
    if args.device == "cuda":
        from medgen.nn import fused

        x = torch.randn(2, 64, 64, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.zeros(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)

        def composite() -> torch.Tensor:
            return F.silu(F.group_norm(x, 32, w, b))

        def fused_fn(backend: str) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                fused.set_fused_backend(backend)
                return fused.group_norm_act(x, 32, w, b, act="silu")

            return run

        timings = {}
        for name, fn in [
            ("triton", fused_fn("triton")),
            ("reference", fused_fn("reference")),
            ("eager_composite", composite),
        ]:
            times = []
            for i in range(12):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn().backward(g)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            timings[name] = sorted(times)[len(times) // 2]
        fused.set_fused_backend("auto")
        record["timing_fwd_bwd_s"] = {"shape": list(x.shape), "dtype": "bfloat16", **timings}
    return record


def step_nets(args: argparse.Namespace) -> dict[str, Any]:
    """``bench_nets.py --precision bf16``: ours against MONAI, eager and (GPU) compiled."""
    import bench_nets

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_nets_"))
    common = ["--device", args.device, "--precision", "bf16"]
    if args.dry_run:
        # The smallest setting: one 16x16 image through each net, once.
        bench_nets.CASES["unet2d_16"] = ("unet", 2, 1, 16)
        bench_nets.CASES["ae2d_16"] = ("ae", 2, 1, 16)
        common += ["--cases", "unet2d_16", "ae2d_16", "--checkpointing", "off"]
        common += ["--repeats", "1", "--warmup", "0"]
    with argv([*common, "--out", str(tmp / "eager.json")]):
        bench_nets.main()
    record: dict[str, Any] = {"eager": json.loads((tmp / "eager.json").read_text())}
    if args.dry_run:
        record["compiled"] = {
            "skipped": "not in --dry-run: inductor compiles these nets in minutes on a CPU; on a "
            "GPU the same step runs bench_nets.py --compile"
        }
    else:
        compiled = [*common, "--compile", "--cases", "unet3d_64", "ae3d_64"]
        compiled += ["--checkpointing", "off", "--repeats", "5", "--warmup", "2"]
        with argv([*compiled, "--out", str(tmp / "compiled.json")]):
            bench_nets.main()
        record["compiled"] = json.loads((tmp / "compiled.json").read_text())
    return record


def _estimate_loop(
    args: argparse.Namespace,
    jobs: list[tuple[str, str, list[str]]],
    out_name: str,
    record: dict[str, Any],
    warmup: int = 2,
    steps: int = 3,
) -> dict[str, Any]:
    """Run ``(key, experiment, overrides)`` estimates, saving after each; errors are recorded."""
    quiet_lightning()
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    if args.dry_run:
        warmup, steps = 0, 1
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    results, failures = record.setdefault("results", {}), record.setdefault("failed", {})
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for key, experiment, overrides in jobs:
            if deadline is not None and time.monotonic() > deadline:
                record.setdefault("not_run", []).append(key)
                continue
            try:
                if args.device == "cuda":
                    import torch

                    torch.cuda.empty_cache()
                r = run_estimate(experiment, overrides, Path(tmp), accelerator, warmup, steps)
                results[key] = r
                print(f"{key}: {_summary(r)}", flush=True)
            except Exception as err:  # recorded, and the step fails at the end
                failures[key] = f"{type(err).__name__}: {err}"
                print(f"{key}: FAILED {failures[key]}", flush=True)
                traceback.print_exc()
            write_json(args.output / out_name, record)
    if record.get("not_run"):
        print(f"not run (time budget): {record['not_run']}", flush=True)
    return record


def step_train(args: argparse.Namespace) -> dict[str, Any]:
    """A few bf16 training steps of every experiment: peak memory and steps/s."""
    experiments = args.experiments or (["quickstart"] if args.dry_run else EXPERIMENTS)
    common = ["data.train.length=16", "data.val.length=2", "~callbacks.progress_bar"]
    if args.device == "cuda":
        common += ["trainer=gpu"]
    else:
        common += ["trainer.precision=bf16-mixed"]
    if args.dry_run:
        common += ["data.train.size=16", "data.batch_size=2"]
    jobs = [(e, e, [*common, *ADVERSARIAL_START.get(e, "").split()]) for e in experiments]
    record = {"environment": environment(args.device), "common_overrides": common}
    return _estimate_loop(args, jobs, "training.json", record)


def step_presets(args: argparse.Namespace) -> dict[str, Any]:
    """Every 3D experiment at ``hardware=gpuNN``: measured peak against the preset's memory."""
    import torch

    if args.device == "cuda":
        # By default the largest preset this GPU holds: its volumes (up to 256^3) are the
        # furthest extrapolation of the estimates. --presets gpu16 gpu24 ... for the others.
        total = torch.cuda.get_device_properties(0).total_memory
        fitting = [p for p, gb in PRESETS.items() if gb * GIB <= total * 1.05]
        presets = args.presets or fitting[-1:]
    else:
        presets = args.presets or ["gpu16"]
    experiments = args.experiments or (["ddpm_3d"] if args.dry_run else EXPERIMENTS_3D)
    common = ["data.train.length=16", "data.val.length=2", "~callbacks.progress_bar"]
    if args.dry_run:  # the path of the presets, at a size a CPU runs in seconds
        common += ["data.train.size=8", "data.batch_size=1", "trainer.accelerator=cpu"]
    else:  # a 256^3 phantom takes seconds to draw: draw them in parallel
        common += ["data.num_workers=8"]
    # Largest presets first: they hold the largest volumes.
    jobs = [
        (f"{e}@{p}", e, [f"hardware={p}", *common, *ADVERSARIAL_START.get(e, "").split()])
        for p in sorted(presets, key=PRESETS.get, reverse=True)
        for e in experiments
    ]
    record = {
        "environment": environment(args.device),
        "presets": presets,
        "common_overrides": common,
    }
    # Memory is measured on the second batch (after the first step made the optimiser state).
    record = _estimate_loop(args, jobs, "presets.json", record, warmup=0, steps=1)
    for key, r in record["results"].items():
        preset = key.split("@")[1]
        limit = PRESETS[preset] * GIB  # a "16 GB" card holds about 16 GiB
        used = r.get("cuda_max_reserved", r["peak_bytes"])
        r["fits"] = {"limit_bytes": limit, "used_bytes": used, "fraction": used / limit}
        if args.device == "cuda" and used > limit:
            record["failed"][key] = f"reserves {used / GIB:.1f} GiB > {PRESETS[preset]} GiB"
    return record


def step_decode(args: argparse.Namespace) -> dict[str, Any]:
    """``bench_autoencoders.py`` at 256^3: whole and tiled decoding, peak memory, seams."""
    import bench_autoencoders

    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_decode_"))
    if args.dry_run:
        # Random weights instead of the benchmark's brief training (minutes of 3D on a CPU).
        from medgen.models import AutoencoderKL

        model = AutoencoderKL(
            net=bench_autoencoders.NET, spatial_dims=3, discriminator=None, perceptual={"weight": 0}
        )
        model.save_pretrained(tmp / "random_autoencoder")
        cli = ["--sizes", "16", "--tile", "2", "--checkpoint", str(tmp / "random_autoencoder")]
        cli += ["--max-whole", "16", "--modes", "layerwise", "tile", "--overlap", "0"]
        cli += ["--border", "2"]
    else:
        cli = ["--sizes", "256", "--tile", "16", "--train-steps", "100", "--max-whole", "256"]
        cli += ["--modes", "layerwise", "tile"]
    cli += ["--device", args.device, "--offload-dir", str(tmp / "offload")]
    with argv([*cli, "--out", str(tmp / "decode.json")]):
        bench_autoencoders.main()
    return json.loads((tmp / "decode.json").read_text())


# ------------------------------------------------------------------------- docs estimates
def step_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """The memory estimates behind ``docs/scaling.md`` (CPU, bf16): measure small, scale up.

    For each 3D experiment and checkpointing off / on, one bf16 training step is measured on the
    CPU at batch 1 and two volume sizes. The persistent part (parameters, gradients, optimiser
    state, EMA, buffers) is kept; the rest (activations and temporaries) is fitted as
    ``c + k * batch * voxels`` and evaluated at each preset's batch and size.
    """
    quiet_lightning()
    sizes = args.sizes or [32, 48]
    experiments = args.experiments or EXPERIMENTS_3D
    out = args.output / "hardware_estimates_cpu.json"
    # Runs of a subset of experiments add to (and replace entries of) an earlier file.
    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    record.update(
        environment=environment("cpu"),
        method="CPU bf16 estimate_memory at batch 1 and sizes "
        f"{sizes}; persistent bytes kept, the rest fitted as c + k * batch * voxels",
    )
    for name in ("fits", "measurements", "failed"):
        record.setdefault(name, {})
    with tempfile.TemporaryDirectory(prefix="gpu_check_estimate_") as tmp:
        for experiment in experiments:
            for on in (False, True):
                key = f"{experiment}/{'ckpt' if on else 'no_ckpt'}"
                record["failed"].pop(key, None)
                points = []
                try:
                    for size in sizes:
                        s = size if experiment != "pix2pix_3d" else 32 * max(1, round(size / 32))
                        overrides = [
                            "data.train.length=8",
                            "data.val.length=2",
                            f"data.train.size={s}",
                            "data.batch_size=1",
                            "trainer.precision=bf16-mixed",
                            "~callbacks.progress_bar",
                            *checkpointing_overrides(experiment, on),
                            *ADVERSARIAL_START.get(experiment, "").split(),
                        ]
                        r = run_estimate(experiment, overrides, Path(tmp), "cpu", 1, 1)
                        persistent = sum(
                            v for k, v in r["breakdown"].items() if k != "trainable_parameters"
                        )
                        points.append((s, r["peak_bytes"], persistent))
                        record["measurements"][f"{key}/{s}"] = r
                        print(f"{key} {s}^3: {_summary(r)}", flush=True)
                    (s1, p1, persistent), (s2, p2, _) = points
                    k = ((p2 - persistent) - (p1 - persistent)) / (s2**3 - s1**3)
                    c = max(0.0, (p1 - persistent) - k * s1**3)
                    record["fits"][key] = {"persistent": persistent, "c": c, "k_per_voxel": k}
                except Exception as err:
                    record["failed"][key] = f"{type(err).__name__}: {err}"
                    traceback.print_exc()
                write_json(out, record)
    return record


def predict(fit: dict[str, float], batch: int, size: int) -> float:
    """Estimated peak bytes of one step at ``batch`` volumes of ``size^3`` from a fit."""
    return fit["persistent"] + fit["c"] + fit["k_per_voxel"] * batch * size**3


#: Volume sizes the presets choose from (multiples of 32: every 3D net divides them).
SIZES = [64, 96, 128, 160, 192, 224, 256]
BATCHES = [1, 2, 4, 8]


def budget_bytes(gpu_gb: int) -> float:
    """Estimated peak a preset may reach: 80% of the GPU, less 1 GiB (CUDA context, cuDNN
    workspaces, allocator fragmentation: none of them is in a CPU estimate)."""
    return 0.8 * gpu_gb * GIB - GIB


def choose(fits: dict[str, dict[str, float]], experiment: str, gpu_gb: int) -> dict[str, Any]:
    """The settings a preset picks from the estimates (the rule of docs/scaling.md).

    The largest size of :data:`SIZES` at which batch 2 fits with checkpointing (else batch 1);
    at that size the largest batch of :data:`BATCHES` that fits with checkpointing; checkpointing
    off when that batch fits without it too.
    """
    on, off = fits[f"{experiment}/ckpt"], fits[f"{experiment}/no_ckpt"]
    limit = budget_bytes(gpu_gb)
    sizes = [s for s in SIZES if predict(on, 2, s) <= limit] or [
        s for s in SIZES if predict(on, 1, s) <= limit
    ]
    if not sizes:
        raise ValueError(f"{experiment} does not fit {gpu_gb} GB at {SIZES[0]}^3")
    size = max(sizes)
    batch = max(b for b in BATCHES if predict(on, b, size) <= limit)
    checkpointing = predict(off, batch, size) > limit
    fit = on if checkpointing else off
    return {
        "size": size,
        "batch_size": batch,
        "gradient_checkpointing": checkpointing,
        "estimate_bytes": predict(fit, batch, size),
        "limit_bytes": limit,
        "tiled_decoding": experiment in STAGE_ONE and size >= 128,
    }


def step_table(args: argparse.Namespace) -> dict[str, Any]:
    """Settings chosen from ``hardware_estimates_cpu.json`` and the estimates of the tuned files.

    Prints the markdown table of ``docs/scaling.md``: for every 3D experiment and preset, the
    settings in ``medgen/configs/hardware/tuned`` and their estimated peak (checkpointing as set
    there), with the rule's own choice where it differs.
    """
    from omegaconf import OmegaConf

    estimates = json.loads((args.output / "hardware_estimates_cpu.json").read_text())
    fits = estimates["fits"]
    rows, record = [], {"chosen": {}, "tuned": {}}
    header = (
        "| experiment | GPU | batch | volume | checkpointing | tiled decoding | estimated peak "
        "| budget |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for experiment in args.experiments or EXPERIMENTS_3D:
        for preset, gb in PRESETS.items():
            chosen = choose(fits, experiment, gb)
            record["chosen"][f"{experiment}@{preset}"] = chosen
            path = (
                ROOT / "medgen" / "configs" / "hardware" / "tuned" / preset / f"{experiment}.yaml"
            )
            if not path.is_file():
                continue
            conf = OmegaConf.to_container(OmegaConf.load(path))
            size, batch = conf["data"]["train"]["size"], conf["data"]["batch_size"]
            owner = CHECKPOINTING[experiment][0].split(".")
            ckpt = bool(conf[owner[0]][owner[1]].get("gradient_checkpointing", False))
            tiled = bool((conf["model"].get("decode_kwargs") or {}).get("layerwise", False))
            fit = fits[f"{experiment}/{'ckpt' if ckpt else 'no_ckpt'}"]
            est = predict(fit, batch, size)
            record["tuned"][f"{experiment}@{preset}"] = {"estimate_bytes": est}
            rows.append(
                f"| {experiment} | {gb} GB | {batch} | {size}³ | {'on' if ckpt else 'off'} | "
                f"{'16³ latent tiles, layer by layer' if tiled else '—'} | "
                f"{est / GIB:.1f} GiB | {budget_bytes(gb) / GIB:.1f} GiB |"
            )
    table = "\n".join([header, *rows])
    print(table)
    for key, c in record["chosen"].items():
        print(key, c)
    record["markdown"] = table
    return record


STEPS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "triton": step_triton,
    "nets": step_nets,
    "train": step_train,
    "presets": step_presets,
    "decode": step_decode,
    "estimate": step_estimate,
    "table": step_table,
}
OUTPUTS = {
    "triton": "triton.json",
    "nets": "nets.json",
    "train": "training.json",
    "presets": "presets.json",
    "decode": "decode.json",
    "estimate": "hardware_estimates_cpu.json",
    "table": "hardware_table.json",
}


def main(argv_: list[str] | None = None) -> int:
    """Run one step; write its JSON; return 0 when it passed, 1 when anything failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "gpu")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--experiments", nargs="+", default=None)
    parser.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS))
    parser.add_argument("--sizes", nargs=2, type=int, default=None, help="estimate: two sizes")
    parser.add_argument("--budget-s", type=float, default=None, help="start no run after this")
    args = parser.parse_args(argv_)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / OUTPUTS[args.step]
    start = time.monotonic()
    try:
        record = STEPS[args.step](args)
        failed = bool(record.get("failed"))
        status = "failed" if failed else "ok"
    except Exception as err:
        traceback.print_exc()
        record = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        status, failed = "failed", True
    record = {
        **record,
        "step": args.step,
        "status": status,
        "dry_run": args.dry_run,
        "seconds": time.monotonic() - start,
    }
    record.setdefault("environment", environment(args.device))
    write_json(path, record)
    print(f"{args.step}: {status} ({record['seconds']:.1f} s) -> {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
