"""Properties every net in :mod:`medgen.nets` must have, checked on tiny 2D and 3D instances.

Parametrised over every ``nn.Module`` class exported by ``medgen.nets.__all__`` (as timm tests every
registered model): output shape, gradient checkpointing that changes nothing but memory,
channels-last inputs, float64 and bfloat16, and a forward that ``torch.compile`` traces without
graph breaks. A net added to ``__all__`` needs an entry in :data:`CASES`, or these tests fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import medgen.nets
from medgen.nets import (
    AutoencoderKLNet,
    DCGANDiscriminator,
    DCGANGenerator,
    Decoder,
    DiffusionUNet,
    Encoder,
    NLayerDiscriminator,
    PixelDiscriminator,
    ResnetGenerator,
    UnetGenerator,
    VAENet,
    WGANCritic,
)
from medgen.nn.distributions import DiagonalGaussian

BATCH = 2
SPATIAL_DIMS = (2, 3)

# Nets whose forward is not a plain differentiable map, tested in their own files instead:
# VQGANNet's forward updates its EMA codebook (compiler-disabled initialisation, float32 statistics,
# integer code indices); see tests/test_models_autoencoder.py and tests/test_nn_quantizer.py.
# The StyleGAN2 generator draws fresh per-pixel noise at every call (one torch.Generator per sample),
# so two calls are not comparable here; both StyleGAN2 nets are tested in
# tests/test_stylegan2_nets.py (2D/3D shapes, gradient checkpointing, seeds, parameter counts).
OWN_TESTS = {"VQGANNet", "StyleGAN2Generator", "StyleGAN2Discriminator"}
NET_CLASSES: list[type[nn.Module]] = [
    obj
    for name in medgen.nets.__all__
    if name not in OWN_TESTS
    and isinstance(obj := getattr(medgen.nets, name), type)
    and issubclass(obj, nn.Module)
]


# ------------------------------------------------------------------------------------------------
# one tiny configuration per net and spatial_dims
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A tiny net configuration and the inputs of its forward.

    Attributes:
        kwargs: Constructor kwargs besides ``spatial_dims`` (dropout, if any, left at 0).
        image: ``(channels, size)`` of the ``(B, channels, *(size,) * spatial_dims)`` input, or a
            width ``n`` for a ``(B, n)`` vector input (a generator's latent).
        out: Expected ``(channels, size)`` of the (first) output, or ``n`` for a ``(B, n)`` one.
        extra: Builds the other forward kwargs from ``(dtype, generator)``.
    """

    kwargs: dict[str, Any]
    image: tuple[int, int] | int
    out: tuple[int, int] | int
    extra: Callable[[torch.dtype, torch.Generator], dict[str, Tensor]] = field(
        default=lambda dtype, g: {}
    )


def _diffusion_extra(dtype: torch.dtype, g: torch.Generator) -> dict[str, Tensor]:
    return {
        "timesteps": torch.randint(0, 1000, (BATCH,), generator=g),
        "context": torch.randn(BATCH, 3, 6, generator=g).to(dtype),
        "class_labels": torch.randint(0, 3, (BATCH,), generator=g),
    }


# Compile time grows with every block, so attention is in one place per family: the Decoder's
# lowest level and middle block, and the DiffusionUNet's middle block (self and cross attention).
_AE = {"channels": (8, 16), "norm_num_groups": 4}
# GAN nets: two stages on 8 px (a latent -> 2 px -> 4 -> 8, or 8 -> 4 -> 2 -> one score).
_GAN = {"image_size": 8}

CASES: dict[type[nn.Module], Callable[[int], Case]] = {
    Encoder: lambda sd: Case({"in_channels": 1, "out_channels": 4, **_AE}, (1, 8), (4, 4)),
    Decoder: lambda sd: Case(
        {
            "in_channels": 4,
            "out_channels": 1,
            **_AE,
            "attention_levels": (False, True),
            "num_head_channels": 8,
        },
        (4, 4),
        (1, 8),
    ),
    VAENet: lambda sd: Case({"in_channels": 1, "latent_channels": 2, **_AE}, (1, 8), (1, 8)),
    AutoencoderKLNet: lambda sd: Case(
        {"num_res_blocks": 1, "attention_levels": (False, False), "latent_channels": 2, **_AE},
        (1, 8),
        (1, 8),
    ),
    DiffusionUNet: lambda sd: Case(
        {
            "in_channels": 1,
            "out_channels": 1,
            **_AE,
            "num_res_blocks": 1,
            "attention_levels": (False, False),
            "num_head_channels": 8,
            "with_conditioning": True,
            "cross_attention_dim": 6,
            "num_class_embeds": 3,
            "dropout": 0.0,
            "dropout_cattn": 0.0,
        },
        (1, 8),
        (1, 8),
        _diffusion_extra,
    ),
    ResnetGenerator: lambda sd: Case(
        {
            "in_channels": 2,
            "out_channels": 1,
            "ngf": 4,
            "n_blocks": 1,
            "norm": "batch",
            "use_dropout": False,
        },
        (2, 8),
        (1, 8),
    ),
    UnetGenerator: lambda sd: Case(
        {"in_channels": 2, "out_channels": 1, "num_downs": 3, "ngf": 4, "use_dropout": False},
        (2, 8),
        (1, 8),
    ),
    # n_layers=1 on 8 px: a stride-2 conv then two k4/s1/p1 convs, 8 -> 4 -> 3 -> 2 patches.
    NLayerDiscriminator: lambda sd: Case(
        {"in_channels": 2, "ndf": 4, "n_layers": 1}, (2, 8), (1, 2)
    ),
    PixelDiscriminator: lambda sd: Case({"in_channels": 2, "ndf": 4}, (2, 8), (1, 8)),
    DCGANGenerator: lambda sd: Case(
        {"latent_dim": 6, "out_channels": 1, "channels": (8, 4), **_GAN}, 6, (1, 8)
    ),
    DCGANDiscriminator: lambda sd: Case({"in_channels": 2, "channels": (4, 8), **_GAN}, (2, 8), 1),
    WGANCritic: lambda sd: Case(
        {"in_channels": 2, "channels": (4, 8), "norm": "layer", **_GAN}, (2, 8), 1
    ),
}


def _case(cls: type[nn.Module], spatial_dims: int) -> Case:
    if cls not in CASES:
        pytest.fail(f"{cls.__name__} is in medgen.nets.__all__ but has no entry in CASES.")
    return CASES[cls](spatial_dims)


def _shape(spec: tuple[int, int] | int, spatial_dims: int) -> tuple[int, ...]:
    """The batched shape a :class:`Case` ``image`` or ``out`` entry describes."""
    if isinstance(spec, int):
        return (BATCH, spec)
    channels, size = spec
    return (BATCH, channels, *(size,) * spatial_dims)


def _build(cls: type[nn.Module], spatial_dims: int, seed: int = 0, **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    return cls(spatial_dims, **{**_case(cls, spatial_dims).kwargs, **overrides})


def _inputs(
    cls: type[nn.Module], spatial_dims: int, dtype: torch.dtype = torch.float32, seed: int = 1
) -> tuple[Tensor, dict[str, Tensor]]:
    case = _case(cls, spatial_dims)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*_shape(case.image, spatial_dims), generator=g).to(dtype)
    return x, case.extra(dtype, g)


def _tensors(out: Any) -> list[Tensor]:
    """Every tensor of a forward's output (tensor, tuple, or a posterior)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, DiagonalGaussian):
        return [out.mean, out.logvar]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    raise TypeError(f"Unexpected forward output type {type(out).__name__}.")


def _forward(net: nn.Module, x: Tensor, extra: dict[str, Tensor], seed: int = 2) -> list[Tensor]:
    torch.manual_seed(seed)  # the same noise for nets that sample (VAENet)
    return _tensors(net(x, **extra))


def _memory_format(spatial_dims: int) -> torch.memory_format:
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d


def _to_memory_format(x: Tensor, fmt: torch.memory_format) -> Tensor:
    """``x`` in ``fmt`` if it is an image; a vector input (a latent) has no channels-last layout."""
    return x.contiguous(memory_format=fmt) if x.dim() >= 4 else x


def _saved_bytes(net: nn.Module, x: Tensor, extra: dict[str, Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward pass."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward(net, x, extra)
    return sum(storages.values())


def _assert_all_close(actual: list[Tensor], expected: list[Tensor], **tol: float) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tol)


params = pytest.mark.parametrize(
    "cls, spatial_dims",
    [pytest.param(c, sd, id=f"{c.__name__}-{sd}d") for c in NET_CLASSES for sd in SPATIAL_DIMS],
)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU waiting for them costs
    far more than the work (a 8x8 conv takes ~20 ms with 2 threads against ~0.2 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """Start and leave every compile test with an empty dynamo cache."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_every_exported_net_has_a_case():
    assert NET_CLASSES, "medgen.nets.__all__ exports no nn.Module"
    missing = sorted(c.__name__ for c in NET_CLASSES if c not in CASES)
    assert not missing, f"add tiny configurations to CASES for: {missing}"
    stale = sorted(c.__name__ for c in CASES if c not in NET_CLASSES)
    assert not stale, f"CASES has nets that medgen.nets no longer exports: {stale}"


@params
def test_output_shape(cls, spatial_dims):
    case = _case(cls, spatial_dims)
    net = _build(cls, spatial_dims).eval()
    x, extra = _inputs(cls, spatial_dims)
    with torch.no_grad():
        out = _forward(net, x, extra)[0]
    assert out.shape == _shape(case.out, spatial_dims)


@params
def test_gradient_checkpointing_changes_nothing_but_memory(cls, spatial_dims):
    plain = _build(cls, spatial_dims, gradient_checkpointing=False).train()
    ckpt = _build(cls, spatial_dims, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, extra = _inputs(cls, spatial_dims)

    results = []
    for net in (plain, ckpt):
        out = _forward(net, x, extra)
        sum(t.float().square().mean() for t in out).backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads)
        results.append((out, grads, list(net.buffers())))
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = results
    _assert_all_close(out_b, out_a, rtol=0, atol=0)
    _assert_all_close(grads_b, grads_a, rtol=0, atol=0)
    # Norm running statistics are updated once per forward, not again on recomputation.
    _assert_all_close(bufs_b, bufs_a, rtol=0, atol=0)
    # ... and checkpointing does keep fewer activations for the backward pass.
    assert _saved_bytes(ckpt, x, extra) < _saved_bytes(plain, x, extra)


@params
def test_channels_last_matches_contiguous(cls, spatial_dims):
    net = _build(cls, spatial_dims).eval()
    x, extra = _inputs(cls, spatial_dims)
    with torch.no_grad():
        expected = _forward(net, x, extra)
        fmt = _memory_format(spatial_dims)
        net_cl = copy.deepcopy(net).to(memory_format=fmt)
        actual = _forward(net_cl, _to_memory_format(x, fmt), extra)
    _assert_all_close(actual, expected, atol=1e-5, rtol=1e-5)


@params
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_float_dtypes(cls, spatial_dims, dtype):
    net = _build(cls, spatial_dims).to(dtype).eval()
    x, extra = _inputs(cls, spatial_dims, dtype)
    with torch.no_grad():
        out = _forward(net, x, extra)
    assert all(t.dtype == dtype for t in out)
    assert all(torch.isfinite(t).all() for t in out)


@params
@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph_matches_eager(cls, spatial_dims):
    net = _build(cls, spatial_dims).eval()
    x, extra = _inputs(cls, spatial_dims)
    compiled = torch.compile(net, backend="eager", fullgraph=True)  # a graph break raises
    with torch.no_grad():
        expected = _forward(net, x, extra)
        actual = _forward(compiled, x, extra)
    _assert_all_close(actual, expected, atol=1e-6, rtol=1e-5)


# Nets whose checkpointed blocks are exactly those of other nets here, traced in those nets' cases
# (tracing checkpointed regions is slow): VAENet checkpoints only inside its Encoder and Decoder.
CHECKPOINT_TRACED_IN = {VAENet: (Encoder, Decoder)}


@pytest.mark.parametrize(
    "cls",
    [c for c in NET_CLASSES if c not in CHECKPOINT_TRACED_IN],
    ids=lambda c: c.__name__,
)
@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_fullgraph_checkpointed_training_forward(cls):
    # The checkpointing branch of forward (training, grad enabled) must trace without breaks too.
    # 2D only: it does not depend on spatial_dims.
    spatial_dims = 2
    net = _build(cls, spatial_dims, gradient_checkpointing=True).train()
    x, extra = _inputs(cls, spatial_dims)
    expected = _forward(copy.deepcopy(net), x, extra)
    actual = _forward(torch.compile(net, backend="eager", fullgraph=True), x, extra)
    _assert_all_close(actual, expected, atol=1e-6, rtol=1e-5)
