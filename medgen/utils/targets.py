"""The explicit list of what a config may build: public names, their definitions, old aliases.

Configs travel inside checkpoints and exported model folders, so every ``_target_`` is untrusted
input. A target is resolved only by an exact lookup in :data:`TARGETS` (a public name, e.g.
``medgen.models.GAN``) or :data:`ALIASES` (a module path written by an older medgen, e.g.
``medgen.models.gan.GAN``): the table says which module to import and which one attribute to
read. Nothing is resolved by walking the attributes of a module named in the config, so
``torch.os.system``, ``torch.utils.collect_env.run`` or ``medgen.api.os.system`` are refused
however they are spelled.

Checkpoints and exports store the public name (:func:`public_name`), so a class can move to another
module without breaking saved models: add its old path to :data:`ALIASES`.

Code you trust (your own scripts, not a config) can allow more with :func:`register_target`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class UnsafeTargetError(ValueError):
    """Raised when a config names a ``_target_`` that is not on medgen's list."""


def _table(module: str, *names: str, prefix: str | None = None) -> dict[str, str]:
    prefix = module if prefix is None else prefix
    return {f"{prefix}.{name}": f"{module}:{name}" for name in names}


#: Public name -> ``"module:attribute"`` (the attribute may be ``Class.classmethod``).
TARGETS: dict[str, str] = {
    # model families
    **_table(
        "medgen.models",
        "AGGrGAN",
        "AutoencoderKL",
        "CycleGAN",
        "Diffusion",
        "GAN",
        "Pix2Pix",
        "StyleGAN2",
        "VAE",
        "VQGAN",
    ),
    # nets
    **_table(
        "medgen.nets",
        "AutoencoderKLNet",
        "DCGANDiscriminator",
        "DCGANGenerator",
        "Decoder",
        "DiffusionUNet",
        "Encoder",
        "NLayerDiscriminator",
        "PixelDiscriminator",
        "ResnetGenerator",
        "StyleGAN2Discriminator",
        "StyleGAN2Generator",
        "UnetGenerator",
        "VAENet",
        "VQGANNet",
        "WGANCritic",
    ),
    # data
    **_table(
        "medgen.data",
        "LatentDataset",
        "MedicalDataModule",
        "PairedDataset",
        "PairedDataset.bci",
        "PairedPhantomDataset",
        "PatchDataset",
        "PhantomDataset",
        "SliceDataset",
        "UnpairedDataset",
        "VolumeDataset",
    ),
    **_table(
        "medgen.data.presets",
        "CTWindow",
        "CropOrPad",
        "HistologyRGB",
        "Identity",
        "MRPercentile",
        "Microscopy16",
        "Orient",
        "Pipeline",
        "Resample",
        "ScaleRange",
    ),
    # callbacks, schedules
    **_table(
        "medgen.callbacks",
        "CSVLogger",
        "EMA",
        "FidelityMonitor",
        "ImageLogger",
        "NumericalGuard",
        "Preemption",
        "ProgressBar",
        "RNGState",
    ),
    **_table("medgen.finetune", "FinetuneCallback"),
    **_table("medgen.utils.schedulers", "lr_policy"),
    **_table("medgen.runs.memory", "fsdp_strategy"),
    # optimisers and learning-rate schedulers (LBFGS needs a closure; LambdaLR-style schedulers
    # take arbitrary callables: both left out)
    **_table(
        "torch.optim",
        "Adadelta",
        "Adagrad",
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "SGD",
    ),
    **_table(
        "torch.optim.lr_scheduler",
        "ConstantLR",
        "CosineAnnealingLR",
        "CosineAnnealingWarmRestarts",
        "CyclicLR",
        "ExponentialLR",
        "LinearLR",
        "MultiStepLR",
        "OneCycleLR",
        "PolynomialLR",
        "ReduceLROnPlateau",
        "StepLR",
    ),
    # Lightning: trainer, loggers, callbacks, strategies
    **_table("lightning", "Trainer"),
    **_table("lightning.pytorch", "Trainer"),
    **_table("lightning.pytorch.loggers", "CSVLogger", "TensorBoardLogger"),
    **_table(
        "lightning.pytorch.callbacks",
        "DeviceStatsMonitor",
        "EarlyStopping",
        "LearningRateMonitor",
        "ModelCheckpoint",
        "ModelSummary",
        "RichModelSummary",
        "RichProgressBar",
        "TQDMProgressBar",
        "Timer",
    ),
    **_table("lightning.pytorch.strategies", "DDPStrategy", "FSDPStrategy", "SingleDeviceStrategy"),
}

#: Old or defining module paths -> public name. Checkpoints written before names were public
#: store the defining module path; a class that moves keeps its old path here.
ALIASES: dict[str, str] = {
    "medgen.finetune.callback.FinetuneCallback": "medgen.finetune.FinetuneCallback",
    **{
        f"medgen.models.{m}.{n}": f"medgen.models.{n}"
        for m, n in [
            ("aggrgan", "AGGrGAN"),
            ("aggrgan.module", "AGGrGAN"),  # a package since the split of aggrgan.py
            ("autoencoder", "AutoencoderKL"),
            ("autoencoder", "VQGAN"),
            ("translation", "CycleGAN"),
            ("diffusion", "Diffusion"),
            ("gan", "GAN"),
            ("translation", "Pix2Pix"),
            ("stylegan2", "StyleGAN2"),
            ("vae", "VAE"),
        ]
    },
    **{
        f"medgen.nets.{m}.{n}": f"medgen.nets.{n}"
        for m, n in [
            ("gan", "DCGANDiscriminator"),
            ("gan", "DCGANGenerator"),
            ("autoencoder", "AutoencoderKLNet"),
            ("autoencoder", "Decoder"),
            ("diffusion_unet", "DiffusionUNet"),
            ("autoencoder", "Encoder"),
            ("translation", "NLayerDiscriminator"),
            ("translation", "PixelDiscriminator"),
            ("translation", "ResnetGenerator"),
            ("stylegan2", "StyleGAN2Discriminator"),
            ("stylegan2", "StyleGAN2Generator"),
            ("translation", "UnetGenerator"),
            ("vae", "VAENet"),
            ("vqgan", "VQGANNet"),
            ("gan", "WGANCritic"),
        ]
    },
    **{
        f"medgen.data.{m}.{n}": f"medgen.data.{n}"
        for m, n in [
            ("latents", "LatentDataset"),
            ("datamodule", "MedicalDataModule"),
            ("datasets", "PairedDataset"),
            ("datasets", "PairedDataset.bci"),
            ("phantoms", "PairedPhantomDataset"),
            ("datasets", "PatchDataset"),
            ("phantoms", "PhantomDataset"),
            ("datasets", "SliceDataset"),
            ("datasets", "UnpairedDataset"),
            ("datasets", "VolumeDataset"),
            # defining modules since medgen.data.datasets and medgen.data.phantoms are packages
            ("datasets.paired", "PairedDataset"),
            ("datasets.paired", "PairedDataset.bci"),
            ("datasets.patches", "PatchDataset"),
            ("datasets.slices", "SliceDataset"),
            ("datasets.unpaired", "UnpairedDataset"),
            ("datasets.volumes", "VolumeDataset"),
            ("phantoms.datasets", "PairedPhantomDataset"),
            ("phantoms.datasets", "PhantomDataset"),
        ]
    },
    **{
        f"medgen.callbacks.{m}.{n}": f"medgen.callbacks.{n}"
        for m, n in [
            ("ema", "EMA"),
            ("image_logger", "ImageLogger"),
            ("rng", "RNGState"),
            ("guard", "NumericalGuard"),
            ("csv_logger", "CSVLogger"),
            ("preemption", "Preemption"),
            ("fidelity", "FidelityMonitor"),
        ]
    },
    "pytorch_lightning.Trainer": "lightning.pytorch.Trainer",
    "lightning.pytorch.trainer.trainer.Trainer": "lightning.pytorch.Trainer",
}

#: Objects allowed at run time by :func:`register_target` (trusted code only).
_REGISTERED: dict[str, Any] = {}


def register_target(obj: Callable[..., Any], name: str | None = None) -> str:
    """Allow configs to build ``obj`` under ``name`` (default: its module path and name).

    Call this from code you trust, e.g. a training script that uses your own dataset class; a
    config alone can never extend the list.

    Returns:
        The name under which configs may now use it.
    """
    if not callable(obj):
        raise TypeError(f"register_target needs a class or function, got {obj!r}")
    name = name or f"{obj.__module__}.{obj.__qualname__}"
    _REGISTERED[name] = obj
    return name


def canonical_name(name: str) -> str:
    """The public name for ``name`` (itself, or what its alias points to).

    Raises:
        UnsafeTargetError: ``name`` is not on the list.
    """
    if not isinstance(name, str):
        raise UnsafeTargetError(f"_target_ must be a string naming an allowed class, got {name!r}")
    if name in TARGETS or name in _REGISTERED:
        return name
    if name in ALIASES:
        return ALIASES[name]
    raise UnsafeTargetError(
        f"_target_={name!r} is not allowed: configs, checkpoints and exports may build "
        "only medgen's models, nets, datasets, presets and callbacks, torch optimisers and "
        "schedulers, and Lightning's trainer, loggers and callbacks (medgen.utils.targets."
        "TARGETS); from trusted code, allow more with medgen.utils.targets.register_target"
    )


def resolve_target(name: str) -> Callable[..., Any]:
    """The object a ``_target_`` names, by exact lookup in the list (never attribute walking).

    Raises:
        UnsafeTargetError: ``name`` is not on the list.
    """
    name = canonical_name(name)
    if name in _REGISTERED:
        return _REGISTERED[name]
    module_name, _, attr = TARGETS[name].partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):  # a fixed path from the table, not from the config
        obj = getattr(obj, part)
    return obj


def public_name(obj: Any, strict: bool = True) -> str:
    """The name under which ``obj`` (a class or function on the list) is stored in checkpoints.

    Args:
        obj: A class or function.
        strict: Raise when ``obj`` is not on the list; otherwise return its defining path (a
            user's own subclass, which loads after :func:`register_target`).

    Raises:
        UnsafeTargetError: ``obj`` is not on the list (``strict`` only).
    """
    for name, registered in _REGISTERED.items():
        if registered is obj:
            return name
    defining = f"{obj.__module__}.{obj.__qualname__}"
    for candidate in (defining, ALIASES.get(defining)):
        if candidate in TARGETS and resolve_target(candidate) is obj:
            return candidate
    for name, spec in TARGETS.items():  # public name from another module (e.g. a re-export)
        if spec.rpartition(":")[2] == obj.__qualname__ and resolve_target(name) is obj:
            return name
    if not strict:
        return defining
    raise UnsafeTargetError(
        f"{defining} is not on medgen's list of buildable classes; a saved config naming it could "
        "not be loaded (add it to medgen.utils.targets.TARGETS, or register_target it)"
    )
