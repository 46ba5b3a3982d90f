"""medgen's nets against MONAI's at identical configurations: step time and activation memory.

For each case (diffusion UNet and KL autoencoder; 2D at 128², 3D at 32³ and 64³) both nets are
built with the same configuration and seed, then measured in one process:

* **time**: one forward + backward step (``loss = out.square().mean()``), ours and MONAI's run
  alternately (the order flips every repeat), after warm-up; the ratio ours / MONAI is the median
  of the per-repeat ratios, so load on a shared machine cancels out;
* **activation memory**:
  - ``saved``: bytes of the distinct storages autograd saves for backward, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` (deterministic; what the issue asks for);
  - ``retained``: bytes of every storage created during the forward pass that is still alive when
    it returns (a ``TorchDispatchMode`` keeps weak references), i.e. the activation memory
    actually held until backward. This one also counts what activation checkpointing keeps (block
    inputs), which the hooks cannot see, so it is the measure used for checkpointing on;
  - ``peak``: the highest total of those live storages at any point of the forward *and*
    backward pass (a running sum kept by weak-reference finalisers), i.e. the CPU counterpart of
    ``max_memory_allocated``. This is the fair measure for checkpointing: MONAI's
    ``AutoencoderKL(use_checkpoint=True)`` checkpoints the whole encoder and decoder, so it keeps
    almost nothing after the forward pass but recomputes a whole half of the net in backward;
  - on CUDA also ``cuda_peak``: ``torch.cuda.max_memory_allocated`` over the step, minus the memory
    held before it;
* **parameters** of both nets.

Ours runs in its best layout for the device (``--layout auto``): channels-last-3d for volumes and
contiguous for 2D on a CPU (where channels-last slows 2D convolutions down), channels-last for
both on CUDA; ``--layout channels_last|contiguous`` forces one. MONAI runs as its users run it (contiguous, ``use_flash_attention=True``, its faster attention path).
``--monai-channels-last`` also converts MONAI's net and input, to show how much of the gain is the
layout alone. Checkpointing: ours ``gradient_checkpointing=True``; MONAI's ``AutoencoderKL``
``use_checkpoint=True``; MONAI's ``DiffusionModelUNet`` has no such option.

Run:  python benchmarks/bench_nets.py [--cases unet3d_32 ...] [--device cuda] [--precision bf16]
      [--compile] [--repeats 5] [--out benchmarks/results/nets_cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import medgen
from medgen.utils.memory import saved_tensor_bytes

UNET = dict(
    in_channels=1,
    out_channels=1,
    channels=(32, 64, 64),
    num_res_blocks=1,
    attention_levels=(False, False, True),
    num_head_channels=64,
    norm_num_groups=32,
)
AE = dict(
    in_channels=1,
    out_channels=1,
    channels=(32, 64, 64),
    num_res_blocks=1,
    attention_levels=(False, False, True),
    latent_channels=4,
    norm_num_groups=32,
)
# name: (family, spatial_dims, batch, size)
CASES = {
    "unet2d_128": ("unet", 2, 2, 128),
    "unet3d_32": ("unet", 3, 2, 32),
    "unet3d_64": ("unet", 3, 1, 64),
    "ae2d_128": ("ae", 2, 2, 128),
    "ae3d_32": ("ae", 3, 2, 32),
    "ae3d_64": ("ae", 3, 1, 64),
}


def build(family: str, spatial_dims: int, checkpointing: bool) -> tuple[nn.Module, nn.Module]:
    """(ours, MONAI's) at the same configuration."""
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    from medgen.nets import DiffusionUNet, VAENet

    torch.manual_seed(0)
    if family == "unet":
        ours = DiffusionUNet(spatial_dims, **UNET, gradient_checkpointing=checkpointing)
        ref = DiffusionModelUNet(spatial_dims=spatial_dims, **UNET, use_flash_attention=True)
    else:
        ours = VAENet(spatial_dims, **AE, gradient_checkpointing=checkpointing)
        ref = AutoencoderKL(
            spatial_dims=spatial_dims,
            **AE,
            with_encoder_nonlocal_attn=True,
            with_decoder_nonlocal_attn=True,
            use_checkpoint=checkpointing,
            use_flash_attention=True,
        )
    return ours, ref


def step_fn(family: str, net: nn.Module, x: Tensor, autocast: Callable) -> Callable[[], Tensor]:
    """A closure running the forward pass and returning the scalar loss."""
    t = torch.linspace(0, 999, x.shape[0], device=x.device).long()

    def forward() -> Tensor:
        with autocast():
            out = net(x, t) if family == "unet" else net(x)[0]
            return out.float().square().mean()

    return forward


class _Retained(TorchDispatchMode):
    """Weak references to every storage an op creates, to sum what is still alive later."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[weakref.ref, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                self.refs[s.data_ptr()] = (weakref.ref(s), s.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(n for ref, n in self.refs.values() if ref() is not None)


class _Peak(TorchDispatchMode):
    """Running total of bytes in storages created by ops (freed ones subtracted), and its peak."""

    def __init__(self, ignore: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()
        # Storages that existed before the call (e.g. a preallocated output written in place):
        # ops that return them or views of them create nothing.
        self.ignored = {t.untyped_storage().data_ptr() for t in ignore}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        # An output that shares an input's storage (a view, an in-place op, ``copy_`` into a
        # slice) creates nothing: without this, slicing a tensor made outside the counter (the
        # input, or a memory-mapped volume) would count that whole tensor as created.
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                key = id(s)
                if key not in self.seen and s.data_ptr() in self.ignored | inputs:
                    continue
                if key not in self.seen and s.nbytes() > 0:
                    self.seen.add(key)
                    self.live += s.nbytes()
                    weakref.finalize(s, self._free, key, s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(forward: Callable[[], Tensor], net: nn.Module) -> int:
    """Highest live bytes created by ops during ``forward()`` and its backward pass."""
    net.zero_grad(set_to_none=True)
    mode = _Peak()
    with mode:
        forward().backward()
    return mode.peak


def retained_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes created during ``forward()`` and still alive when it returns (then runs backward)."""
    mode = _Retained()
    with mode:
        loss = forward()
    alive = mode.alive_bytes()
    loss.backward()
    return alive


def timed_step(forward: Callable[[], Tensor], net: nn.Module, device: torch.device) -> float:
    net.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def cuda_peak(forward: Callable[[], Tensor], net: nn.Module) -> int:
    net.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_case(name: str, args: argparse.Namespace, checkpointing: bool) -> dict:
    family, dims, batch, size = CASES[name]
    device = torch.device(args.device)
    ours, ref = build(family, dims, checkpointing)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn(batch, 1, *(size,) * dims, generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    layout = args.layout
    if layout == "auto":
        layout = "channels_last" if dims == 3 or device.type == "cuda" else "contiguous"
    x_ours = x.contiguous(memory_format=fmt) if layout == "channels_last" else x
    x_ref = x.contiguous(memory_format=fmt) if args.monai_channels_last else x
    ours = ours.to(device).train()
    ref = ref.to(device).train()
    if layout == "channels_last":
        ours = ours.to(memory_format=fmt)
    if args.monai_channels_last:
        ref = ref.to(memory_format=fmt)

    if args.precision == "bf16":

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    result: dict = {
        "case": name,
        "family": family,
        "spatial_dims": dims,
        "input_shape": list(x.shape),
        "checkpointing": checkpointing,
        "layout_ours": layout,
        "layout_monai": "channels_last" if args.monai_channels_last else "contiguous",
        "params": {"ours": n_ours, "monai": n_ref},
        "monai_has_checkpointing": family == "ae",
    }
    # Memory is measured eagerly (dispatch modes and hooks do not mix with compiled graphs).
    f_ours, f_ref = step_fn(family, ours, x_ours, autocast), step_fn(family, ref, x_ref, autocast)
    mem = {
        "peak_bytes": {"ours": peak_bytes(f_ours, ours), "monai": peak_bytes(f_ref, ref)},
        "retained_bytes": {"ours": retained_bytes(f_ours), "monai": retained_bytes(f_ref)},
    }
    if not checkpointing:
        mem["saved_bytes"] = {
            "ours": saved_tensor_bytes(f_ours),
            "monai": saved_tensor_bytes(f_ref),
        }
    for v in mem.values():
        v["ratio"] = v["ours"] / v["monai"]
    if device.type == "cuda":
        peak = {"ours": cuda_peak(f_ours, ours), "monai": cuda_peak(f_ref, ref)}
        peak["ratio"] = peak["ours"] / peak["monai"]
        mem["cuda_peak_bytes"] = peak
    result["memory"] = mem

    if args.compile:
        ours_c, ref_c = torch.compile(ours), torch.compile(ref)
        f_ours = step_fn(family, ours_c, x_ours, autocast)
        f_ref = step_fn(family, ref_c, x_ref, autocast)
    for _ in range(args.warmup):
        timed_step(f_ours, ours, device)
        timed_step(f_ref, ref, device)
    t_ours, t_ref = [], []
    for r in range(args.repeats):
        if r % 2 == 0:
            t_ours.append(timed_step(f_ours, ours, device))
            t_ref.append(timed_step(f_ref, ref, device))
        else:
            t_ref.append(timed_step(f_ref, ref, device))
            t_ours.append(timed_step(f_ours, ours, device))
    if not t_ours:
        result["time_s"] = {"ours": float("nan"), "monai": float("nan"), "ratio": float("nan")}
        return result
    result["time_s"] = {
        "ours": statistics.median(t_ours),
        "monai": statistics.median(t_ref),
        "ratio": statistics.median(a / b for a, b in zip(t_ours, t_ref, strict=True)),
        "ours_all": t_ours,
        "monai_all": t_ref,
    }
    if args.compile:
        torch._dynamo.reset()
    return result


def _fmt(r: dict) -> str:
    mem = r["memory"]["peak_bytes"]
    saved = r["memory"].get("saved_bytes")
    return (
        f"{r['case']:<11} ckpt={'on ' if r['checkpointing'] else 'off'} "
        f"time {r['time_s']['ours']:.3f}s / {r['time_s']['monai']:.3f}s = "
        f"{r['time_s']['ratio']:.2f}  peak {mem['ours'] / 2**20:.0f} / "
        f"{mem['monai'] / 2**20:.0f} MiB = {mem['ratio']:.2f}"
        + (f"  saved ratio {saved['ratio']:.2f}" if saved else "")
    )


def markdown_table(record: dict) -> str:
    """A markdown table of one results file (the rows of ``docs/performance.md``)."""
    mib = 2**20
    lines = [
        "| case | ckpt | layout (ours) | params ours / MONAI | step s ours / MONAI | time ratio "
        "| saved MiB ours / MONAI | saved ratio | kept after forward, ratio "
        "| peak MiB ours / MONAI | peak ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["results"]:
        t, ret = r["time_s"], r["memory"]["peak_bytes"]
        kept = r["memory"]["retained_bytes"]
        sv = r["memory"].get("saved_bytes")
        saved = f"{sv['ours'] / mib:.0f} / {sv['monai'] / mib:.0f}" if sv else "—"
        saved_ratio = f"{sv['ratio']:.2f}" if sv else "—"
        ckpt = "on" if r["checkpointing"] else "off"
        if r["checkpointing"] and not r["monai_has_checkpointing"]:
            ckpt += " (ours only)"
        lines.append(
            f"| {r['case']} {tuple(r['input_shape'])} | {ckpt} | {r.get('layout_ours', '?')} | "
            f"{r['params']['ours']:,} / {r['params']['monai']:,} | "
            f"{t['ours']:.2f} / {t['monai']:.2f} | {t['ratio']:.2f} | {saved} | {saved_ratio} | "
            f"{kept['ratio']:.2f} | "
            f"{ret['ours'] / mib:.0f} / {ret['monai'] / mib:.0f} | {ret['ratio']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--layout", default="auto", choices=["auto", "channels_last", "contiguous"])
    parser.add_argument("--monai-channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (0: memory only)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--table", type=Path, default=None, help="print the markdown table of a results file"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.cases:
        for ckpt in args.checkpointing:
            r = run_case(name, args, ckpt == "on")
            print(_fmt(r), flush=True)
            results.append(r)
    import monai

    record = {
        "benchmark": "nets",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "repeats": args.repeats,
        "versions": {
            "medgen": medgen.__version__,
            "monai": monai.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "configs": {"unet": UNET, "ae": AE},
        "results": results,
    }
    tag = f"{args.device}_{args.precision}" + ("_compiled" if args.compile else "")
    out = args.out or Path(__file__).parent / "results" / f"nets_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(markdown_table(record))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
