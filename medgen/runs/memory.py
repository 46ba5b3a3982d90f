"""How much memory one training step of a composed config needs, and FSDP's block classes.

:func:`estimate_memory` builds the data module and the model from a composed ``train`` config
exactly as :func:`medgen.runs.training.train` does, runs a few training steps on one device under
the trainer's precision (a Lightning ``Trainer`` with one device, so manual-optimisation models
such as GANs and pix2pix step as they do in training) and reports the peak memory of one step:

* on CUDA, ``torch.cuda.max_memory_allocated`` over one step after warm-up (parameters, gradients,
  optimiser state, EMA copies and activations are all on the device, so this is the number that
  has to fit);
* on a CPU, the largest of two deterministic counts (DESIGN.md, "Performance is measured"):
  (a) parameters + buffers + one gradient per trainable parameter + optimiser state + EMA shadow
  weights + the bytes of the distinct storages autograd saves for backward during the step
  (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), and (b) the peak of live
  tensor storages during the step (a ``TorchDispatchMode`` keeps a running total of what ops create,
  on top of what existed when the step began, and subtracts storages as they are freed). (a) is
  blind to the block inputs that activation checkpointing keeps (checkpointing runs its own saved-
  tensor hooks), (b) sees them and every temporary; both are reported.

CPU counts are *estimates* of a GPU's needs: the CUDA caching allocator's fragmentation and
workspaces (cuDNN, cuBLAS, the CUDA context of ~0.5 GiB) are not in them, and CPU and CUDA autocast
cast slightly different op lists to bf16.

:func:`fsdp_strategy` builds Lightning's ``FSDPStrategy`` from block *names* (``trainer=fsdp``):
configs travel with checkpoints, so names resolve only through the explicit table
:data:`FSDP_BLOCKS`, never by importing what a config names.
"""

from __future__ import annotations

import importlib
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from medgen.runs.composition import register_resolvers
from medgen.utils.instantiate import instantiate, to_plain
from medgen.utils.targets import canonical_name

__all__ = ["FSDP_BLOCKS", "estimate_memory", "fsdp_strategy", "resolve_blocks"]

#: Block names a config may give to ``trainer=fsdp`` (auto-wrap and activation checkpointing)
#: -> ``"module:class"``. ResBlock and SelfAttention are the repeated units of the diffusion UNet
#: and of the autoencoders' encoder and decoder; SpatialTransformer those of conditioned UNets
#: (CrossAttention those built with legacy_layout=True).
FSDP_BLOCKS: dict[str, str] = {
    "medgen.nn.ResBlock": "medgen.nn.blocks:ResBlock",
    "medgen.nn.SelfAttention": "medgen.nn.attention:SelfAttention",
    "medgen.nn.CrossAttention": "medgen.nn.cross_attention:CrossAttention",
    "medgen.nn.SpatialTransformer": "medgen.nn.cross_attention:SpatialTransformer",
    "medgen.nn.ConvBlock": "medgen.nn.blocks:ConvBlock",
    "medgen.nets.DiffusionUNet": "medgen.nets.diffusion_unet:DiffusionUNet",
    "medgen.nets.Encoder": "medgen.nets.autoencoder:Encoder",
    "medgen.nets.Decoder": "medgen.nets.autoencoder:Decoder",
    "medgen.nets.ResnetBlock": "medgen.nets.translation:ResnetBlock",
    "medgen.nets.UnetSkipBlock": "medgen.nets.translation:UnetSkipBlock",
}

_EMA_TARGET = "medgen.callbacks.EMA"


# ------------------------------------------------------------------------------------- FSDP
def resolve_blocks(names: Iterable[str] | None) -> set[type[nn.Module]]:
    """The module classes named in ``names``, looked up in :data:`FSDP_BLOCKS` only.

    Args:
        names: Public block names, e.g. ``["medgen.nn.ResBlock", "medgen.nn.SelfAttention"]``;
            ``None`` or empty gives an empty set.

    Returns:
        The classes, as the set Lightning's ``auto_wrap_policy`` / ``activation_checkpointing_policy``
        accept.

    Raises:
        ValueError: A name is not in :data:`FSDP_BLOCKS` (the message lists the allowed names).
    """
    classes: set[type[nn.Module]] = set()
    for name in names or ():
        spec = FSDP_BLOCKS.get(str(name))
        if spec is None:
            raise ValueError(
                f"FSDP block {name!r} is not allowed; trainer.strategy.auto_wrap and "
                f"activation_checkpointing take names from medgen.runs.memory.FSDP_BLOCKS: "
                f"{sorted(FSDP_BLOCKS)}"
            )
        module_name, _, attr = spec.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)  # a fixed path from the table
        classes.add(cls)
    return classes


def fsdp_strategy(
    auto_wrap: Iterable[str] | None = None,
    activation_checkpointing: Iterable[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Lightning's ``FSDPStrategy`` with auto-wrap and activation checkpointing given by block names.

    Args:
        auto_wrap: Names of the block classes each wrapped in its own FSDP unit (their parameters
            are gathered only while the block runs); see :data:`FSDP_BLOCKS`.
        activation_checkpointing: Names of the block classes whose activations are recomputed in
            the backward pass (FSDP's own checkpoint wrapper).
        **kwargs: Other ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments, e.g.
            ``sharding_strategy="FULL_SHARD"``, ``state_dict_type="full"``,
            ``use_orig_params=True``, ``cpu_offload=False``.

    Returns:
        A ``lightning.pytorch.strategies.FSDPStrategy``.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    wrap = resolve_blocks(auto_wrap)
    ckpt = resolve_blocks(activation_checkpointing)
    return FSDPStrategy(
        auto_wrap_policy=wrap or None,
        activation_checkpointing_policy=ckpt or None,
        **kwargs,
    )


# ------------------------------------------------------------------------------ measuring
def _storage_key(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class _LivePeak(TorchDispatchMode):
    """Running total of live tensor bytes: ``base`` plus storages ops create, minus frees.

    ``tracked`` tensors (those alive when the step began that may be freed during it, such as the
    previous step's gradients) are subtracted when their storage dies.
    """

    def __init__(self, base: int, tracked: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.live = base
        self.peak = base
        self.seen: set[int] = set()
        self._existing: set[int] = set()
        for t in tracked:
            s = t.untyped_storage()
            if s.data_ptr() in self._existing:
                continue
            self._existing.add(s.data_ptr())
            weakref.finalize(s, self._release, s.data_ptr(), s.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._existing.discard(key)

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = {
            _storage_key(t)
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = id(s)
            # Views and in-place results share an input's storage: nothing new was allocated.
            if key in self.seen or s.data_ptr() in inputs or s.data_ptr() in self._existing:
                continue
            if s.nbytes() > 0:
                self.seen.add(key)
                self.live += s.nbytes()
                weakref.finalize(s, self._free, key, s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


class _SavedBytes:
    """Distinct storages autograd saves for backward while active (parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.storages: dict[int, int] = {}
        self.exclude = exclude
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.exclude and t.device.type != "meta":
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self) -> _SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _optimizer_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[Tensor]:
    tensors: list[Tensor] = []
    for opt in optimizers:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
    return tensors


def _shapes(batch: Any) -> dict[str, list[int]]:
    if isinstance(batch, Mapping):
        return {str(k): list(v.shape) for k, v in batch.items() if isinstance(v, Tensor)}
    flat = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
    return {str(i): list(t.shape) for i, t in enumerate(flat)}


def _find_key(node: Any, key: str, path: str = "model") -> dict[str, Any]:
    """Every ``key`` in a plain nested config, by dotted path."""
    found: dict[str, Any] = {}
    if isinstance(node, Mapping):
        for k, v in node.items():
            where = f"{path}.{k}"
            if k == key:
                found[where] = v
            else:
                found.update(_find_key(v, key, where))
    return found


def _device_type(accelerator: str) -> str:
    accelerator = str(accelerator).lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return "cpu"
    raise ValueError(
        f"estimate_memory supports accelerator cpu, gpu/cuda or auto, got {accelerator!r}"
    )


def _probe_class() -> type:
    import lightning as L

    class _StepProbe(L.Callback):
        """Times ``steps`` training batches after ``warmup`` and measures memory on the next."""

        def __init__(self, warmup: int, steps: int, device: str, ema: list[Any]) -> None:
            self.warmup, self.steps, self.device, self.ema = warmup, steps, device, ema
            self.batches = 0
            self.times: list[float] = []
            self.input_shapes: dict[str, list[int]] = {}
            self.result: dict[str, Any] = {}
            self._start = 0.0
            self._saved: _SavedBytes | None = None
            self._peak: _LivePeak | None = None

        def _sync(self) -> None:
            if self.device == "cuda":
                torch.cuda.synchronize()

        @property
        def _memory_batch(self) -> int:
            return self.warmup + self.steps

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if self.batches == 0:
                self.input_shapes = _shapes(batch)
            if self.batches == self._memory_batch:
                self._begin_memory(trainer, pl_module)
            self._sync()
            self._start = time.perf_counter()

        def _begin_memory(self, trainer, pl_module) -> None:  # noqa: ANN001
            params = list(pl_module.parameters())
            trainable = [p for p in params if p.requires_grad]
            grads = [p.grad for p in params if p.grad is not None]
            opt_state = _optimizer_tensors(trainer.optimizers)
            ema_state = [t for cb in self.ema for t in cb.shadow.values()]
            self.result["breakdown"] = {
                "parameters": _bytes(params),
                "trainable_parameters": _bytes(trainable),
                "gradients": _bytes(trainable),  # one gradient per trainable parameter
                "buffers": _bytes(pl_module.buffers()),
                "optimizer_state": _bytes(opt_state),
                "ema": _bytes(ema_state),
            }
            exclude = {_storage_key(p) for p in params}
            self._saved = _SavedBytes(exclude).__enter__()
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                self.result["cuda_allocated_before"] = torch.cuda.memory_allocated()
            else:
                alive = [*params, *grads, *pl_module.buffers(), *opt_state, *ema_state]
                self._peak = _LivePeak(_bytes(alive), tracked=grads)
                self._peak.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            self._sync()
            seconds = time.perf_counter() - self._start
            if self.warmup <= self.batches < self._memory_batch:
                self.times.append(seconds)
            if self.batches == self._memory_batch:
                if self._peak is not None:
                    self._peak.__exit__(None, None, None)
                    self.result["live_peak_bytes"] = self._peak.peak
                if self._saved is not None:
                    self._saved.__exit__(None, None, None)
                    self.result["saved_tensor_bytes"] = self._saved.total
                if self.device == "cuda":
                    self.result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
                    self.result["cuda_max_reserved"] = torch.cuda.max_memory_reserved()
                trainer.should_stop = True
            self.batches += 1

    return _StepProbe


def estimate_memory(
    cfg: DictConfig,
    *,
    warmup: int = 1,
    steps: int = 1,
    accelerator: str | None = None,
) -> dict[str, Any]:
    """Peak memory and speed of one training step of the run ``cfg`` describes.

    The data module, model and EMA callbacks are built from ``cfg`` as
    :func:`medgen.runs.training.train` builds them; a one-device Lightning ``Trainer`` with the
    config's ``trainer.precision`` (and gradient clipping) runs ``warmup`` untimed batches,
    ``steps`` timed batches and one batch under the memory probes, then stops. Nothing is written
    outside a temporary folder. A multi-device ``trainer.strategy`` (DDP, FSDP) is not used: the
    result is what one device holds without sharding (DDP holds about the same per GPU, plus its
    gradient buckets; FSDP less).

    Args:
        cfg: A composed ``train`` config (:func:`medgen.compose`).
        warmup: Untimed batches first (optimiser state is created by the first step, kernels are
            selected, ``latent_scale: auto`` is measured).
        steps: Timed batches (``steps_per_s`` is their mean rate, instrumentation off).
        accelerator: ``"cpu"``, ``"gpu"``/``"cuda"`` or ``"auto"``; default ``cfg.trainer.accelerator``.

    Returns:
        A dict with ``peak_bytes`` (the headline number), ``method`` (how it was measured, in
        words), ``device``, ``steps_per_s``, ``breakdown`` (parameters, gradients, buffers,
        optimiser state, EMA), ``saved_tensor_bytes``, on a CPU ``live_peak_bytes`` and
        ``formula_bytes`` (the two counts of the module docstring), on CUDA ``cuda_max_allocated``
        and ``cuda_max_reserved``, and ``settings`` (task, precision, batch size, input shapes,
        gradient-checkpointing flags, decode arguments, what was not applied).
    """
    import lightning as L

    from medgen.callbacks import EMA

    register_resolvers()
    if warmup < 0 or steps < 1:
        raise ValueError(f"estimate_memory needs warmup >= 0 and steps >= 1, got {warmup}, {steps}")
    trainer_cfg = to_plain(cfg.trainer)
    device = _device_type(accelerator or trainer_cfg.get("accelerator", "cpu"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("estimate_memory: the config asks for a GPU and none is available")
    precision = str(trainer_cfg.get("precision", "32-true"))
    L.seed_everything(int(cfg.get("seed", 0)), workers=True, verbose=False)

    datamodule = instantiate(cfg.data, _recursive_=False, _convert_="all")
    model = instantiate(to_plain(cfg.model), _recursive_=False, _convert_="all")
    ema: list[Any] = []
    for conf in (to_plain(cfg.get("callbacks")) or {}).values():
        if isinstance(conf, Mapping) and canonical_name(conf.get("_target_", "")) == _EMA_TARGET:
            callback = instantiate(conf)
            if isinstance(callback, EMA):
                ema.append(callback)
    probe = _probe_class()(warmup, steps, device, ema)

    with tempfile.TemporaryDirectory(prefix="medgen_memory_") as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            devices=1,
            num_nodes=1,
            strategy="auto",
            precision=precision,
            max_epochs=-1,
            max_steps=-1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
            benchmark=bool(trainer_cfg.get("benchmark", False)),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[*ema, probe],
            default_root_dir=tmp,
        )
        trainer.fit(model, datamodule=datamodule)
    if "saved_tensor_bytes" not in probe.result:
        raise RuntimeError(
            f"estimate_memory: training stopped after {probe.batches} batches, before the measured "
            f"one (batch {warmup + steps}); give the data more samples (data.train.length)"
        )

    res = probe.result
    parts = res["breakdown"]
    formula = (
        parts["parameters"]
        + parts["buffers"]
        + parts["gradients"]
        + parts["optimizer_state"]
        + parts["ema"]
        + res["saved_tensor_bytes"]
    )
    if device == "cuda":
        peak = int(res["cuda_max_allocated"])
        method = (
            "cuda: torch.cuda.max_memory_allocated over one training step after warm-up "
            "(parameters, gradients, optimizer state, EMA and activations on the device)"
        )
    else:
        res["formula_bytes"] = formula
        peak = max(formula, int(res["live_peak_bytes"]))
        method = (
            "cpu estimate: max of (a) parameters + buffers + gradients + optimizer state + EMA "
            "+ bytes saved for backward in one training step (saved_tensors_hooks) and (b) the "
            "peak of live tensor storages during the step (TorchDispatchMode; counts inputs "
            "kept by activation checkpointing and temporaries); no allocator overhead, "
            "workspaces or CUDA context"
        )
    model_cfg = to_plain(cfg.model)
    settings = {
        "task_name": cfg.get("task_name"),
        "accelerator": device,
        "precision": precision,
        "batch_size": cfg.data.get("batch_size"),
        "input_shapes": probe.input_shapes,
        "gradient_checkpointing": _find_key(model_cfg, "gradient_checkpointing"),
        "decode_kwargs": model_cfg.get("decode_kwargs"),
        "ema": [cb.attribute for cb in ema],
        "warmup_steps": warmup,
        "timed_steps": steps,
        "not_applied": {
            "strategy": trainer_cfg.get("strategy", "auto"),
            "devices": trainer_cfg.get("devices"),
            "num_nodes": trainer_cfg.get("num_nodes"),
        },
    }
    mean_s = sum(probe.times) / len(probe.times)
    return {
        "peak_bytes": peak,
        "peak_gib": peak / 2**30,
        "method": method,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "steps_per_s": 1.0 / mean_s if mean_s > 0 else float("inf"),
        "step_seconds": probe.times,
        **{k: v for k, v in res.items() if k != "breakdown"},
        "breakdown": parts,
        "settings": settings,
    }
