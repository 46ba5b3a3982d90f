"""Peak memory and time of whole-image vs tiled translation, and the tiles' interior error.

Each case runs in a fresh subprocess: the model and the input are built, the peak resident set
size is reset (``/proc/self/clear_refs``), the image is translated once, and the growth of the
peak RSS over the RSS before translating is reported (the CPU counterpart of
``torch.cuda.max_memory_allocated``; on ``--device cuda`` the latter is reported). The generator
is a ResNet-9 with batch norm in evaluation mode (``--ngf`` wide, random weights), the pix2pix /
BCI generator. The interior error is the largest difference between tiled and whole translation
away from the image border (8 px), relative to the data range.

    python benchmarks/bench_translation_tiling.py            # 2D 512..2048, 3D 64 and 128
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


def run_case(spatial_dims: int, size: int, tile: int | None, ngf: int, device: str) -> dict:
    """Translate one random image (in this process) and measure it."""
    import torch

    from medgen.models import Pix2Pix

    torch.manual_seed(0)
    torch.set_num_threads(2)
    generator = {"_target_": "medgen.nets.ResnetGenerator", "ngf": ngf, "n_blocks": 9}
    model = Pix2Pix(
        generator={**generator, "norm": "batch"},
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
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    start = time.perf_counter()
    y = model.translate(x, tile=tile, overlap=0.25)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "spatial_dims": spatial_dims,
        "size": size,
        "tile": tile,
        "seconds": round(seconds, 2),
        "peak_mib_over_before": round(_rss_mib("VmHWM") - before, 1),
        "output_mib": round(y.numel() * 4 / 2**20, 1),
    }
    if device.startswith("cuda"):
        result["cuda_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    if tile is not None:
        whole = model.translate(x, tile=None)
        inner = (slice(None), slice(None)) + (slice(8, -8),) * spatial_dims
        result["interior_max_error"] = float((y - whole)[inner].abs().max())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--sizes-2d", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--sizes-3d", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--tile-2d", type=int, default=256)
    parser.add_argument("--tile-3d", type=int, default=48)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/translation_tiling_cpu.json")
    )
    args = parser.parse_args()
    if args.case:
        dims, size, tile = (None if v == "none" else int(v) for v in args.case.split(","))
        print(json.dumps(run_case(dims, size, tile, args.ngf, args.device)))
        return
    cases = [(2, s, t) for s in args.sizes_2d for t in (None, args.tile_2d)]
    cases += [(3, s, t) for s in args.sizes_3d for t in (None, args.tile_3d)]
    rows = []
    for dims, size, tile in cases:
        spec = f"{dims},{size},{'none' if tile is None else tile}"
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
