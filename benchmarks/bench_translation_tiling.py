"""Peak memory and time of whole-image vs tiled translation, and the tiles' interior error.

Each case runs in a fresh subprocess: the model and the input are built, the peak resident set
size is reset (``/proc/self/clear_refs``), the image is translated once, and the growth of the
peak RSS over the RSS before translating is reported (the CPU counterpart of
``torch.cuda.max_memory_allocated``; on ``--device cuda`` the latter is reported), and the peak of
live tensor storages created during the call (``tensor_peak_mib``, the ``_Peak`` counter of
``bench_nets.py``; it leaves out memory-mapped files). The generator is a ResNet-9 (``--ngf``
wide, random weights) with batch norm in evaluation mode, the pix2pix / BCI generator, or with
``--norm instance`` the CycleGAN / COMI one. Tiled modes (``--modes``): ``blend``, overlapping
tiles blended with Gaussian weights, and ``layerwise``, the exact layer-by-layer translation
(``translate(..., layerwise=True)``, its intermediate images in memory-mapped files in a temporary
directory: they are in the RSS once touched, not in ``tensor_peak_mib``). The interior error is
the largest (and mean) difference between tiled and whole translation away from the image border
(8 px), relative to the whole translation's range.

    python benchmarks/bench_translation_tiling.py            # 2D 512..2048, 3D 64 and 128
    python benchmarks/bench_translation_tiling.py --norm instance --modes blend layerwise \
        --sizes-3d --out benchmarks/results/translation_tiling_instance_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def run_case(
    spatial_dims: int,
    size: int,
    tile: int | None,
    ngf: int,
    device: str,
    norm: str = "batch",
    mode: str = "blend",
) -> dict:
    """Translate one random image (in this process) and measure it."""
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_nets import _Peak

    from medgen.models import Pix2Pix

    torch.manual_seed(0)
    torch.set_num_threads(2)
    generator = {"_target_": "medgen.nets.ResnetGenerator", "ngf": ngf, "n_blocks": 9}
    model = Pix2Pix(
        generator={**generator, "norm": norm},
        discriminator={"_target_": "medgen.nets.NLayerDiscriminator", "ndf": 8, "n_layers": 1},
        spatial_dims=spatial_dims,
    ).to(device)
    model.eval()
    x = torch.rand(1, 1, *(size,) * spatial_dims)
    with torch.no_grad():  # warm-up on a small input (allocator, kernels)
        model.translate(torch.rand(1, 1, *(32,) * spatial_dims), tile=None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    offload = tempfile.TemporaryDirectory()
    kwargs = {"overlap": 0.25}
    if mode == "layerwise":
        kwargs = {"layerwise": True, "offload_dir": offload.name}
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    counter = _Peak()
    start = time.perf_counter()
    with counter:
        y = model.translate(x, tile=tile, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    offload.cleanup()
    result = {
        "spatial_dims": spatial_dims,
        "size": size,
        "tile": tile,
        "norm": norm,
        "mode": None if tile is None else mode,
        "seconds": round(seconds, 2),
        "peak_mib_over_before": round(_rss_mib("VmHWM") - before, 1),
        "tensor_peak_mib": round(counter.peak / 2**20, 1),
        "output_mib": round(y.numel() * 4 / 2**20, 1),
    }
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    if tile is not None:
        whole = model.translate(x, tile=None)
        inner = (slice(None), slice(None)) + (slice(8, -8),) * spatial_dims
        diff = (y - whole)[inner].abs()
        scale = float(whole.max() - whole.min())
        result["interior_max_error"] = float(diff.max())
        result["interior_max_error_rel"] = float(diff.max()) / scale
        result["interior_mean_error_rel"] = float(diff.mean()) / scale
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--sizes-2d", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--sizes-3d", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--tile-2d", type=int, default=256)
    parser.add_argument("--tile-3d", type=int, default=48)
    parser.add_argument("--norm", default="batch", choices=("batch", "instance"))
    parser.add_argument(
        "--modes", nargs="+", default=["blend"], choices=("blend", "layerwise"), help="tiled modes"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/translation_tiling_cpu.json")
    )
    args = parser.parse_args()
    if args.case:
        *numbers, mode = args.case.split(",")
        dims, size, tile = (None if v == "none" else int(v) for v in numbers)
        print(json.dumps(run_case(dims, size, tile, args.ngf, args.device, args.norm, mode)))
        return
    cases = []
    for dims, sizes, tile in ((2, args.sizes_2d, args.tile_2d), (3, args.sizes_3d, args.tile_3d)):
        for s in sizes:
            cases.append((dims, s, None, "whole"))
            cases += [(dims, s, tile, mode) for mode in args.modes]
    rows = []
    for dims, size, tile, mode in cases:
        spec = f"{dims},{size},{'none' if tile is None else tile},{mode}"
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                spec,
                "--ngf",
                str(args.ngf),
                "--device",
                args.device,
                "--norm",
                args.norm,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(row, flush=True)
        rows.append(row)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "case"},
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
