"""Nets written as a sequence of stages, for exact tiled inference layer by layer.

A net made of convolutions, resampling, pointwise ops and group / instance / (evaluation-mode)
batch norms can be run on a large volume one *stage* at a time: every stage is a local map (its
outputs depend on the inputs within ``halo`` voxels), optionally preceded by a norm, normalising
with the statistics of the stage's whole input, and an activation. :func:`medgen.tiling.layerwise_apply` runs each stage over the whole
volume tile by tile, with exact halos and the exact whole-tensor statistics, and keeps the
intermediate volumes off the compute device; the result equals running the net on the whole
volume up to floating-point rounding. :meth:`medgen.nets.Decoder.stages` and
:meth:`medgen.nets.Encoder.stages` describe the autoencoder nets this way,
:meth:`medgen.nets.ResnetGenerator.stages` the translation generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from torch import Tensor, nn

from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ResBlock
from medgen.nn.sampling import Downsample, Upsample

__all__ = ["NORMS", "Stage", "check_norm", "conv_halo", "module_stages"]


@dataclass(frozen=True)
class Stage:
    """One step of a net run layer by layer: ``y = fn(act(norm(x))) [+ skip(x_back)]``.

    Attributes:
        fn: A local map: every output voxel depends only on input voxels within ``halo``
            (convolutions, resampling, pointwise ops; no normalisation over positions).
        halo: Input voxels of context ``fn`` needs on each side; ``None`` for a global map
            (self-attention), which runs on the whole tensor at once.
        scale: Output/input size ratio of ``fn`` (2 for an upsampling, 1/2 for a downsampling).
        norm: A normalisation applied to the stage's input: a GroupNorm or an instance norm
            (normalised with the statistics of the *whole* input, measured by the runner), or a
            batch norm in evaluation mode (a pointwise map); ``None`` for none.
        act: Activation applied after ``norm`` (``None``: none).
        skip: If set, ``skip(x_back)`` is added to the output, where ``x_back`` is the input of
            the stage ``skip_back`` places earlier (1: the previous stage), at this stage's
            output size: a residual block's shortcut, or a generator's global residual.
        skip_back: See ``skip``.
        name: Label for progress and error messages.
    """

    fn: Callable[[Tensor], Tensor]
    halo: int | None = 1
    scale: Fraction = Fraction(1)
    norm: nn.Module | None = None
    act: nn.Module | None = None
    skip: nn.Module | None = None
    skip_back: int = 1
    name: str = ""


#: Normalisations a stage can apply (see :attr:`Stage.norm`).
NORMS = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)


def check_norm(module: nn.Module, where: str) -> nn.Module | None:
    """``module`` as a stage's norm (``None`` for an identity); other layers are refused."""
    if isinstance(module, nn.Identity):
        return None
    if not isinstance(module, NORMS):
        raise ValueError(
            f"{where}: layer-by-layer inference supports group, instance and batch norm (or no "
            f"norm), got {type(module).__name__}"
        )
    return module


def conv_halo(conv: nn.Module, where: str = "convolution") -> int:
    """Input voxels of context a (transposed) convolution's outputs need on each side: ``k // 2``
    at stride 1, one more at stride 2.

    Raises:
        ValueError: For a dilated convolution.
    """
    if any(d != 1 for d in conv.dilation):
        raise ValueError(f"{where}: layer-by-layer inference needs undilated convolutions")
    return max(conv.kernel_size) // 2 + (1 if max(conv.stride) > 1 else 0)


def _resblock_stages(block: ResBlock, name: str) -> list[Stage]:
    if block.emb_proj is not None:
        raise ValueError(f"{name}: a ResBlock with an embedding cannot be run layer by layer")
    conv2, dropout = block.conv2, block.dropout

    def second(h: Tensor) -> Tensor:
        return conv2(dropout(h))

    return [
        Stage(
            block.conv1, 1, norm=check_norm(block.norm1, name), act=block.act1, name=f"{name}.conv1"
        ),
        Stage(
            second,
            1,
            norm=check_norm(block.norm2, name),
            act=block.act2,
            skip=block.skip,
            name=f"{name}.conv2",
        ),
    ]


def module_stages(module: nn.Module, name: str) -> list[Stage]:
    """The stages of one building block: a ResBlock (two stages), self-attention (one global
    stage), an Up- or Downsample (one stage with its halo and scale), or a plain convolution.

    Raises:
        ValueError: For a block with no layer-by-layer form.
    """
    if isinstance(module, ResBlock):
        return _resblock_stages(module, name)
    if isinstance(module, SelfAttention):
        return [Stage(module, None, name=name)]
    if isinstance(module, Upsample):
        # nearest + 3x3 conv and the 4x4 transposed conv need one input voxel; the FIR filter
        # (up to 4 taps) two more.
        return [Stage(module, 3 if module.mode == "fir" else 1, Fraction(2), name=name)]
    if isinstance(module, Downsample):
        # Even halos keep every tile's stride-2 grid on the whole volume's.
        return [Stage(module, 4 if module.mode == "fir" else 2, Fraction(1, 2), name=name)]
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        if any(s != 1 for s in module.stride):
            raise ValueError(f"{name}: only stride-1 convolutions are supported here")
        return [Stage(module, conv_halo(module, name), name=name)]
    raise ValueError(f"{name}: {type(module).__name__} has no layer-by-layer form")
