"""Tiled against whole-volume decoding with a 3D KL autoencoder: peak memory, time, seam error.

The autoencoder is :class:`medgen.models.AutoencoderKL` (3D) with Medical Diffusion's first-stage
size: channels [16, 32, 64] (downsampling 4 per axis), one residual block per level, 4 latent
channels, GroupNorm, no attention. Its weights come from ``--checkpoint`` (an exported folder or
``.ckpt``) or from a brief training on 32^3 phantoms (``--train-steps``; L1 + 1e-6 KL, Adam 1e-3):
random weights would not show what GroupNorm statistics and receptive fields of a trained decoder
do to tiles.

For every volume size ``S`` (64, 128, 256 by default) a phantom head of ``S^3`` is encoded (tiled,
per-tile statistics: only the latent matters here) and its latent ``(1, 4, S/4, S/4, S/4)`` is
decoded

* whole (``model.decode(z)``), where it fits;
* in tiles of ``--tile`` latent voxels (16 = 64^3 image tiles), ``--overlap``, Gaussian blending,
  with whole-volume GroupNorm statistics (``norm_stats="global"``, measured layer by layer) and, for
  comparison, per-tile statistics (``norm_stats="tile"``, one pass, as MONAI / MAISI sliding
  windows);
* and one tile alone (a ``tile^3`` latent), the memory reference of the target.

Measured: **peak memory**, on a CPU the highest total of live tensor storages created during the
call (the ``_Peak`` dispatch mode of ``bench_nets.py``: deterministic, it counts activations and
temporaries, not the weights or the input latent), on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before. Tiled decodings write into a preallocated output (``out=``), so
their peak is the *working* memory of decoding, what a GPU needs when the output is assembled on
the host or in a memory-mapped file; ``peak_with_output`` adds the output's size, the peak when
the output lives in the same memory (it is allocated once and live for the whole call); **time** (one run, wall
clock; on a shared CPU only indicative); and the **seam error**: ``|tiled - whole|`` in the
interior (``--border`` image voxels from the volume's faces excluded), max and mean, relative to
the intensity range of the whole decoding.

Run:  python benchmarks/bench_autoencoders.py [--device cpu|cuda] [--sizes 64 128 256]
      [--checkpoint PATH | --train-steps 150] [--tile 16] [--overlap 0.5]
Writes benchmarks/results/autoencoders_{device}.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import medgen
import medgen.inference.layerwise
from medgen.data import PhantomDataset
from medgen.models import AutoencoderKL

sys.path.insert(0, str(Path(__file__).parent))
from bench_nets import _Peak  # noqa: E402  (the peak-live-bytes counter of the nets benchmark)

NET = dict(channels=[16, 32, 64], num_res_blocks=1, latent_channels=4, norm_num_groups=8)


def train_briefly(steps: int, seed: int = 0) -> AutoencoderKL:
    """The benchmark's autoencoder after ``steps`` Adam steps on 32^3 phantoms (batch 2)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(
        net=NET, spatial_dims=3, discriminator=None, perceptual={"weight": 0.0}, kl_weight=1e-6
    )
    data = PhantomDataset(spatial_dims=3, size=32, length=16, seed=seed)
    volumes = torch.stack([data[i]["image"] for i in range(len(data))])
    optimizer = torch.optim.Adam(model.net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(volumes), (2,), generator=generator)
        loss = model.autoencoder_terms(volumes[idx])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            print(f"  train step {step}: loss {float(loss):.4f}", flush=True)
    return model.eval()


def measure(
    fn: Callable[[], torch.Tensor], device: torch.device, preallocated: tuple = ()
) -> tuple[torch.Tensor, int, float]:
    """``(output, peak bytes, seconds)`` of one call of ``fn``; ``preallocated`` tensors (an
    output the call fills in place) are not counted as created by it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return out, torch.cuda.max_memory_allocated() - base, seconds
    mode = _Peak(ignore=preallocated)
    start = time.perf_counter()
    with mode:
        out = fn()
    seconds = time.perf_counter() - start
    return out, mode.peak, seconds


def seam_error(tiled: torch.Tensor, whole: torch.Tensor, border: int) -> dict[str, float]:
    scale = float(whole.max() - whole.min())
    region = (slice(None), slice(None)) + (slice(border, -border),) * (whole.ndim - 2)
    diff = (tiled.float() - whole.float())[region].abs()
    return {
        "interior_max": float(diff.max()) / scale,
        "interior_mean": float(diff.mean()) / scale,
        "interior_p99": float(
            torch.quantile(diff.flatten()[:: max(1, diff.numel() // 2**24)], 0.99)
        )
        / scale,
        "intensity_range": scale,
    }


@contextlib.contextmanager
def _record_intermediates(sizes: list[int]) -> Iterator[None]:
    """Record the byte size of every intermediate volume layer-by-layer decoding allocates."""
    original = medgen.inference.layerwise._Store.empty

    def empty(store, shape, dtype):  # noqa: ANN001, ANN202
        volume = original(store, shape, dtype)
        sizes.append(volume.numel() * volume.element_size())
        return volume

    medgen.inference.layerwise._Store.empty = empty
    try:
        yield
    finally:
        medgen.inference.layerwise._Store.empty = original


def run_size(model: AutoencoderKL, size: int, args, device: torch.device) -> dict:
    f = model.downsample_factor
    image = PhantomDataset(spatial_dims=3, size=size, length=1, seed=1)[0]["image"][None]
    z = model.encode(image, tile=min(size, 64), norm_stats="tile").to(device)
    print(f"size {size}^3: latent {tuple(z.shape)}", flush=True)
    record: dict = {"size": size, "latent_shape": list(z.shape)}
    common = dict(tile=args.tile, overlap=args.overlap, margin=args.margin)

    whole = None
    if size <= args.max_whole:
        whole, peak, seconds = measure(lambda: model.decode(z), device)
        record["whole"] = {"peak_bytes": peak, "seconds": seconds}
        print(f"  whole: peak {peak / 2**20:.0f} MiB, {seconds:.1f} s", flush=True)
        whole = whole.cpu()
    for mode in args.modes:
        # The output volume is allocated before the call and filled by it (``out=``): the peak
        # measured is then the decoding's working memory; holding the output in the same memory
        # adds exactly its size (it is live for the whole call), reported as peak_with_output.
        target = torch.empty(1, 1, *(n * f for n in z.shape[2:]), device=device)
        if mode == "layerwise":
            # Exact layer-by-layer decoding; its intermediate volumes go to memory-mapped files
            # (on a GPU they would be in host memory), so they are not in the measured peak;
            # their largest size is recorded.
            kwargs = dict(tile=args.tile, layerwise=True, offload_dir=args.offload_dir)
        else:
            kwargs = dict(norm_stats=mode, **common)
        sizes: list[int] = []
        with _record_intermediates(sizes):
            out, peak, seconds = measure(
                lambda kwargs=kwargs, target=target: model.decode(z, out=target, **kwargs),
                device,
                preallocated=(target,),
            )
        output_bytes = target.numel() * target.element_size()
        entry = {
            "peak_bytes": peak,
            "output_bytes": output_bytes,
            "peak_with_output_bytes": peak + output_bytes,
            "seconds": seconds,
        }
        if sizes:
            entry["largest_intermediate_bytes"] = max(sizes)
            entry["intermediates"] = len(sizes)
        if whole is not None and size > args.tile * f:
            entry.update(seam_error(out.cpu(), whole, args.border))
        record[f"tiled_{mode}"] = entry
        print(f"  tiled ({mode}): peak {peak / 2**20:.0f} MiB, {seconds:.1f} s, {entry}")
        del out
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--tile", type=int, default=16, help="tile size in latent voxels")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--margin", type=int, default=0, help="latent voxels")
    parser.add_argument("--border", type=int, default=16, help="image voxels left out of errors")
    parser.add_argument("--max-whole", type=int, default=256, help="largest whole decoding")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("global", "tile", "layerwise"),
        default=["global", "tile", "layerwise"],
        help="tiled decodings to run: blended with whole-volume or per-tile statistics, or exact "
        "layer by layer",
    )
    parser.add_argument(
        "--offload-dir",
        type=Path,
        default=Path("/tmp/medgen_bench_offload"),
        help="where layer-by-layer decoding keeps its intermediate volumes",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="print a results file's table")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.checkpoint:
        model = medgen.load(args.checkpoint)
        weights = f"loaded from {args.checkpoint}"
    else:
        model = train_briefly(args.train_steps)
        weights = f"trained {args.train_steps} steps on 32^3 phantoms (batch 2, Adam 1e-3)"
    model = model.to(device).eval()
    f = model.downsample_factor

    one_tile = torch.randn(1, model.latent_channels, *(args.tile,) * 3, device=device)
    _, tile_peak, tile_seconds = measure(lambda: model.decode(one_tile), device)
    print(f"one tile ({args.tile * f}^3 output): peak {tile_peak / 2**20:.0f} MiB", flush=True)
    results = [run_size(model, size, args, device) for size in args.sizes]
    for r in results:
        for key in (f"tiled_{mode}" for mode in args.modes):
            r[key]["peak_vs_one_tile"] = r[key]["peak_bytes"] / tile_peak
            r[key]["peak_with_output_vs_one_tile"] = r[key]["peak_with_output_bytes"] / tile_peak

    record = {
        "benchmark": "autoencoders",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": {"class": "AutoencoderKL", "net": NET, "downsample_factor": f, "weights": weights},
        "tiling": {
            "tile_latent": args.tile,
            "tile_image": args.tile * f,
            "overlap": args.overlap,
            "margin_latent": args.margin,
            "blend": "gaussian",
            "border_excluded": args.border,
        },
        "one_tile": {"peak_bytes": tile_peak, "seconds": tile_seconds},
        "memory_measure": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak live tensor storages created during the call (TorchDispatchMode)",
        "versions": {"medgen": medgen.__version__, "torch": torch.__version__},
        "results": results,
    }
    out = args.out or Path(__file__).parent / "results" / f"autoencoders_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(markdown_table(record))
    print(f"wrote {out}")


LABELS = {
    "global": "blended, whole-volume stats",
    "tile": "blended, per-tile stats",
    "layerwise": "layer by layer (exact)",
}


def markdown_table(record: dict) -> str:
    mib = 2**20
    tile_peak = record["one_tile"]["peak_bytes"]
    t = record["tiling"]
    modes = [m for m in LABELS if any(f"tiled_{m}" in r for r in record["results"])]
    header = ["volume", "whole: peak MiB / s"]
    for mode in modes:
        header += [
            f"{LABELS[mode]}: working peak MiB (x one tile) / with the output in the same "
            "memory (x one tile) / s",
            "interior error max / mean",
        ]
    lines = [
        f"One {t['tile_image']}^3 tile alone: peak {tile_peak / mib:.0f} MiB. Tiles of "
        f"{t['tile_latent']}^3 latent voxels; blended tiles overlap {t['overlap']}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]

    def err(e: dict) -> str:
        if "interior_max" not in e:
            return "n/a"
        return f"{e['interior_max']:.1e} / {e['interior_mean']:.1e}"

    for r in record["results"]:
        w = r.get("whole")
        row = [
            f"{r['size']}^3",
            f"{w['peak_bytes'] / mib:.0f} / {w['seconds']:.1f}" if w else "not run",
        ]
        for mode in modes:
            e = r.get(f"tiled_{mode}")
            if e is None:
                row += ["not run", "n/a"]
                continue
            with_output = e.get("peak_with_output_bytes")  # older results did not record it
            both = (
                f"{with_output / mib:.0f} ({with_output / tile_peak:.2f}x)" if with_output else "-"
            )
            row += [
                f"{e['peak_bytes'] / mib:.0f} ({e['peak_bytes'] / tile_peak:.2f}x) / {both} / "
                f"{e['seconds']:.1f}",
                err(e),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
