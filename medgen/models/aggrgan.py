"""AGGrGAN: aggregation of several GANs' outputs, sharpness-weighted merging and style transfer.

AGGrGAN (Mukherkjee, Saha, Kaplun, Sinitca, Sarkar, "Brain tumor image generation using an
aggregation of GAN models with style transfer", Scientific Reports 12, 2022,
doi 10.1038/s41598-022-12646-y) trains three base GANs (two DCGAN variants and a WGAN), keeps
the best candidates, merges them pixel-wise by local sharpness and refines the merge by neural
style transfer with VGG-19. The
paper has no public code; the concrete choices below follow a published re-implementation (see
``REFERENCES.md``) and every number is a keyword argument:

- :func:`ssim_select`: keep the ``k`` best of ``K`` candidates per sample by SSIM to a real
  image, or by mutual SSIM when there is none.
- :func:`sharpness_weights` / :func:`sharpness_merge`: per-pixel weights from the Sobel gradient
  magnitude smoothed by a Gaussian (``sigma = 2``), normalised over candidates.
- :func:`style_transfer`: Gatys et al. (CVPR 2016) optimisation of the image with Adam so that
  its VGG content features match the merge and its Gram matrices match a style image.
- :func:`aggregate`: selection followed by merging.

All functions take 2D ``(…, C, H, W)`` and 3D ``(…, C, D, H, W)`` tensors (style transfer works
on 3D volumes slice by slice, see :func:`style_transfer`).
"""

from __future__ import annotations

import csv
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.losses.adversarial import AdversarialObjective, resolve_adv_loss
from medgen.losses.perceptual import LayerSpec, VGGFeatures, gram_matrix
from medgen.metrics.pairwise import ssim
from medgen.models.adversarial import DEFAULT_GAN_OPTIMIZER, build_net, zero_step_counter
from medgen.models.base import SAMPLE, WRITE_DATASET
from medgen.models.gan import DEFAULT_DISCRIMINATOR, DEFAULT_GENERATOR, GAN, LatentGANModule

__all__ = [
    "AGGrGAN",
    "aggregate",
    "default_members",
    "sharpness_merge",
    "sharpness_weights",
    "ssim_select",
    "style_transfer",
]


# ---- aggregation ops


def _check_candidates(candidates: Tensor, name: str = "candidates") -> int:
    """Validate ``(K, B, C, *spatial)`` and return the number of spatial dims."""
    if not isinstance(candidates, Tensor) or candidates.ndim not in (5, 6):
        shape = tuple(candidates.shape) if isinstance(candidates, Tensor) else type(candidates)
        raise ValueError(
            f"{name} must be (K, B, C, H, W) or (K, B, C, D, H, W) (K candidates for B samples), "
            f"got {shape}"
        )
    if candidates.shape[0] < 1 or candidates.shape[1] < 1:
        raise ValueError(
            f"{name} must hold at least one candidate and sample, got {candidates.shape}"
        )
    return candidates.ndim - 3


def ssim_select(
    candidates: Tensor,
    reference: Tensor | None = None,
    k: int = 2,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Keep the ``k`` best of ``K`` candidates per sample by SSIM (AGGrGAN's selection step).

    Each candidate ``j`` of sample ``b`` is scored by its SSIM (Wang et al. 2004, see
    :func:`medgen.metrics.pairwise.ssim`) to ``reference[b]`` when a reference is given, otherwise
    by its *mutual SSIM*, the mean SSIM to the other ``K - 1`` candidates of the same sample (the
    candidates most in agreement win). Ties go to the lower candidate index. Scores are computed
    without gradients; ``selected`` is an indexing of ``candidates`` and keeps theirs.

    Args:
        candidates: ``(K, B, C, *spatial)`` outputs of ``K`` generators for ``B`` samples, 2 or 3
            spatial dims.
        reference: ``(B, C, *spatial)`` real images, or ``(1, C, *spatial)`` for one reference
            shared by all samples; ``None`` for mutual SSIM (needs ``K >= 2``).
        k: how many candidates to keep, ``1 <= k <= K``.
        data_range: width of the intensity scale (1 for ``[0, 1]``, 2 for ``[-1, 1]``).
        kernel_size: odd SSIM window size; every spatial side must be at least this long (use
            e.g. 7 for tiny images).
        sigma: SSIM Gaussian window standard deviation.

    Returns:
        ``(selected, indices, scores)``: ``selected`` ``(k, B, C, *spatial)`` the chosen
        candidates, best first; ``indices`` ``(k, B)`` long, their candidate indices; ``scores``
        ``(K, B)`` the score of every candidate.

    Raises:
        ValueError: bad shapes, ``k`` out of range, or images smaller than the window.
    """
    dims = _check_candidates(candidates)
    num, batch = candidates.shape[:2]
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= num:
        raise ValueError(f"k must be an integer in [1, K={num}], got {k!r}")
    spatial = tuple(candidates.shape[3:])
    if int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
    if min(spatial) < kernel_size:
        largest = min(spatial) if min(spatial) % 2 else min(spatial) - 1
        raise ValueError(
            f"candidates of spatial size {spatial} are smaller than the SSIM window "
            f"kernel_size={kernel_size}; pass an odd kernel_size <= {largest}"
        )
    window = {"data_range": data_range, "kernel_size": kernel_size, "sigma": sigma}
    with torch.no_grad():
        if reference is not None:
            if (
                not isinstance(reference, Tensor)
                or reference.ndim != dims + 2
                or tuple(reference.shape[1:]) != tuple(candidates.shape[2:])
                or reference.shape[0] not in (1, batch)
            ):
                shape = tuple(reference.shape) if isinstance(reference, Tensor) else reference
                raise ValueError(
                    f"reference must be (B={batch} or 1, {', '.join(map(str, candidates.shape[2:]))})"
                    f" to match candidates {tuple(candidates.shape)}, got {shape}"
                )
            ref = reference.expand(num, batch, *reference.shape[1:]).flatten(0, 1)
            flat = candidates.detach().flatten(0, 1)
            scores = ssim(flat, ref, reduction="none", **window).view(num, batch)
        else:
            if num < 2:
                raise ValueError("mutual SSIM needs at least two candidates; give a reference")
            first, second = torch.triu_indices(num, num, offset=1, device=candidates.device)
            detached = candidates.detach()
            pair = ssim(
                detached[first].flatten(0, 1),
                detached[second].flatten(0, 1),
                reduction="none",
                **window,
            ).view(-1, batch)
            matrix = pair.new_zeros(num, num, batch)
            matrix[first, second] = pair  # SSIM is symmetric in its two arguments
            matrix[second, first] = pair
            scores = matrix.sum(1) / (num - 1)
        order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:k]
    samples = torch.arange(batch, device=candidates.device)
    selected = candidates[order, samples[None, :]]
    return selected, order, scores


@functools.lru_cache(maxsize=16)
def _gaussian_cpu(sigma: float, truncate: float) -> Tensor:
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def _filter_axis(x: Tensor, kernel: Tensor, axis: int, mode: str) -> Tensor:
    """Filter ``(N, 1, *spatial)`` with a 1D ``kernel`` along spatial ``axis``, same-size output."""
    dims = x.ndim - 2
    radius = kernel.numel() // 2
    if mode == "reflect" and radius >= x.shape[2 + axis]:
        mode = "replicate"  # reflect padding needs pad < size
    pad = [0] * (2 * dims)
    pad_at = 2 * (dims - 1 - axis)  # F.pad lists the last axis first
    pad[pad_at] = pad[pad_at + 1] = radius
    shape = [1, 1] + [1] * dims
    shape[2 + axis] = kernel.numel()
    conv = F.conv2d if dims == 2 else F.conv3d
    return conv(F.pad(x, pad, mode=mode), kernel.to(x.device, x.dtype).view(shape))


def _sobel_magnitude(x: Tensor) -> Tensor:
    """Sobel gradient magnitude of ``(N, 1, *spatial)``: 3x3 (2D) or 3x3x3 (3D) kernels.

    The Sobel kernel along an axis is the central difference ``[-1, 0, 1]`` along it times the
    smoothing ``[1, 2, 1]`` along every other axis (the separable form; in 3D the 3x3x3
    Sobel-Feldman operator). Borders are replicated.
    """
    dims = x.ndim - 2
    derivative = torch.tensor([-1.0, 0.0, 1.0])
    smoothing = torch.tensor([1.0, 2.0, 1.0])
    squared = torch.zeros_like(x)
    for axis in range(dims):
        g = x
        for other in range(dims):
            g = _filter_axis(g, derivative if other == axis else smoothing, other, "replicate")
        squared = squared + g.square()
    return squared.sqrt()


def sharpness_weights(images: Tensor, sigma: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Per-pixel merge weights from local sharpness, normalised over candidates (AGGrGAN).

    For each candidate: the Sobel gradient magnitude (2D: 3x3 Sobel along x and y; 3D: 3x3x3 Sobel
    along each axis), averaged over channels and smoothed by a separable Gaussian of standard
    deviation ``sigma`` (truncated at 4 sigma, as ``scipy.ndimage.gaussian_filter``; reflect
    padding, replicate where an axis is shorter than the kernel radius). The weights are these
    sharpness maps divided by their sum over the ``K`` candidates; where that sum is below ``eps``
    (all candidates flat) every candidate gets ``1 / K``. Computed without gradients.

    Args:
        images: ``(K, B, C, *spatial)`` candidates, 2 or 3 spatial dims.
        sigma: Gaussian standard deviation in pixels (0 for no smoothing); AGGrGAN uses 2.
        eps: threshold on the summed sharpness below which weights are equal.

    Returns:
        ``(K, B, C, *spatial)`` non-negative weights that sum to 1 over ``K`` at every pixel (the
        same for every channel).
    """
    _check_candidates(images, "images")
    if not sigma >= 0:
        raise ValueError(f"sigma must be non-negative, got {sigma!r}")
    num, batch, channels, *spatial = images.shape
    dtype = images.dtype if images.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        x = images.detach().to(dtype).reshape(num * batch * channels, 1, *spatial)
        sharp = _sobel_magnitude(x).view(num * batch, channels, *spatial).mean(1, keepdim=True)
        if sigma > 0:
            kernel = _gaussian_cpu(float(sigma), 4.0)
            for axis in range(len(spatial)):
                sharp = _filter_axis(sharp, kernel, axis, "reflect")
        sharp = sharp.clamp_min(0).view(num, batch, 1, *spatial)
        total = sharp.sum(0, keepdim=True)
        weights = torch.where(total >= eps, sharp / total.clamp_min(eps), 1.0 / num)
    return weights.expand(num, batch, channels, *spatial).to(images.dtype).contiguous()


def sharpness_merge(images: Tensor, sigma: float = 2.0, eps: float = 1e-8) -> Tensor:
    """Merge candidates pixel-wise, each weighted by its local sharpness (AGGrGAN).

    ``merged = sum_k w_k * images_k`` with ``w`` from :func:`sharpness_weights`: at every pixel the
    candidate with the stronger (smoothed) edges dominates, so a blurred candidate contributes
    little where another is sharp. Differentiable in ``images`` with the weights held fixed.

    Args:
        images: ``(K, B, C, *spatial)`` candidates.
        sigma: Gaussian smoothing of the sharpness maps.
        eps: see :func:`sharpness_weights`.

    Returns:
        ``(B, C, *spatial)`` merged images.
    """
    weights = sharpness_weights(images, sigma=sigma, eps=eps)
    return (weights * images).sum(0)


def aggregate(
    candidates: Tensor,
    reference: Tensor | None = None,
    k: int = 2,
    sigma: float = 2.0,
    data_range: float = 1.0,
    kernel_size: int = 11,
) -> tuple[Tensor, dict[str, Tensor]]:
    """AGGrGAN aggregation: keep the ``k`` best candidates by SSIM, then merge them by sharpness.

    Args:
        candidates: ``(K, B, C, *spatial)`` outputs of ``K`` generators.
        reference: ``(B or 1, C, *spatial)`` real images for the selection, or ``None`` for
            mutual SSIM (see :func:`ssim_select`).
        k: candidates kept (AGGrGAN: the best two of three).
        sigma: Gaussian smoothing of the sharpness maps (AGGrGAN: 2).
        data_range: intensity scale width for SSIM.
        kernel_size: SSIM window size.

    Returns:
        ``(merged, selection)``: ``merged`` ``(B, C, *spatial)``; ``selection`` with ``"indices"``
        ``(k, B)`` (best first) and ``"scores"`` ``(K, B)``.
    """
    selected, indices, scores = ssim_select(
        candidates, reference, k=k, data_range=data_range, kernel_size=kernel_size
    )
    return sharpness_merge(selected, sigma=sigma), {"indices": indices, "scores": scores}


def _slices(volume: Tensor) -> Tensor:
    """``(B, C, D, H, W)`` to ``(B * D, C, H, W)`` axial slices."""
    return volume.movedim(2, 1).flatten(0, 1)


def style_transfer(
    content: Tensor,
    style: Tensor,
    extractor: VGGFeatures,
    content_layers: Sequence[LayerSpec] = ("relu4_2",),
    style_layers: Sequence[LayerSpec] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
    content_weight: float = 5.0,
    style_weight: float = 10.0,
    steps: int = 500,
    lr: float = 0.01,
    init: str = "content",
    value_range: tuple[float, float] | None = None,
    return_history: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[float]]]:
    """Neural style transfer (Gatys et al. 2016), AGGrGAN's refinement step.

    The image ``x`` (initialised from ``content``, or uniform noise) is optimised with Adam to
    minimise ``content_weight * L_content + style_weight * L_style`` with

    - ``L_content = sum_l 1/2 sum_ij (F^l_ij - P^l_ij)^2`` over ``content_layers`` (Eq. 1);
    - ``L_style = sum_l w_l E_l`` over ``style_layers`` with ``w_l = 1 / L`` and
      ``E_l = 1/4 sum_ij (G^l_ij - A^l_ij)^2`` for Gram matrices normalised by channels times
      positions (:func:`~medgen.losses.perceptual.gram_matrix`), which is exactly Eq. 4-5;

    both per image, averaged over the batch. The weights are relative to these sums (Gatys et al.
    use ``content_weight / style_weight`` of 1e-3 to 1e-4); their useful values depend on the
    layers, the image size and the weights of the extractor.

    The defaults are Gatys et al.'s layers; the AGGrGAN re-implementation used VGG-19
    ``features`` indices ``(0, 5, 10)``, style weight 10, content weight 5 and 500 Adam steps at
    64x64 (pass e.g. ``style_layers=(0, 5, 10)``). The extractor must reach the deepest layer
    (build it with ``layers`` that include it). The optimisation runs on the image mapped to
    ``[0, 1]``, so ``lr`` is in units of the intensity range whatever ``value_range`` is; the
    result is clamped to ``value_range`` at the end. Gradients are enabled inside even under
    ``torch.no_grad()``; the result is detached.

    Volumes ``(B, C, D, H, W)`` are stylised **per axial slice** (each slice of the batch is an
    independent 2D problem; nothing enforces consistency along D). ``style`` may then be a 2D
    image applied to every slice or a volume with the same depth whose matching slices are used.

    Args:
        content: ``(B, C, H, W)`` or ``(B, C, D, H, W)`` images to stylise (e.g. the merge).
        style: ``(1 or B, C', H', W')`` style images (e.g. real images; any size), or for volumes
            ``(1 or B, C', D, H', W')``.
        extractor: a :class:`~medgen.losses.perceptual.VGGFeatures` (VGG-19 in the paper).
        content_layers: layers for the content loss (names or ``features`` indices).
        style_layers: layers for the style loss.
        content_weight: weight of the content loss (alpha).
        style_weight: weight of the style loss (beta).
        steps: Adam iterations.
        lr: Adam learning rate (per unit of the ``[0, 1]``-mapped intensity).
        init: ``"content"`` or ``"noise"`` (uniform in the range, from torch's global RNG).
        value_range: intensity range of ``content`` and ``style``; default and only allowed
            value: the extractor's.
        return_history: also return the per-step losses.

    Returns:
        Stylised images shaped like ``content``; with ``return_history``, also a dict with lists
        ``"total"``, ``"content"`` and ``"style"`` (the weighted total and the unweighted terms)
        of length ``steps``, each computed before that step's update.
    """
    if not isinstance(extractor, VGGFeatures):
        raise TypeError(f"extractor must be a VGGFeatures, got {type(extractor).__name__}")
    if value_range is not None and tuple(map(float, value_range)) != extractor.value_range:
        raise ValueError(
            f"value_range {tuple(value_range)} differs from the extractor's "
            f"{extractor.value_range}; build the extractor with the range of your images"
        )
    if init not in ("content", "noise"):
        raise ValueError(f"init must be 'content' or 'noise', got {init!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    content_layers, _ = extractor.resolve(content_layers)
    style_layers, _ = extractor.resolve(style_layers)
    all_layers = tuple(dict.fromkeys(content_layers + style_layers))
    if not isinstance(content, Tensor) or content.ndim not in (4, 5):
        raise ValueError(f"content must be (B, C, H, W) or (B, C, D, H, W), got {content!r:.80}")
    if not isinstance(style, Tensor) or style.ndim not in (4, content.ndim):
        raise ValueError(
            f"style must be (1 or B, C, H, W){' or a volume' if content.ndim == 5 else ''}, got "
            f"{tuple(style.shape) if isinstance(style, Tensor) else type(style).__name__}"
        )
    batch = content.shape[0]
    if style.shape[0] not in (1, batch):
        raise ValueError(f"style batch must be 1 or {batch}, got {style.shape[0]}")
    shape = content.shape
    if content.ndim == 5:
        depth = content.shape[2]
        if style.ndim == 5:
            if style.shape[2] != depth:
                raise ValueError(f"style depth {style.shape[2]} differs from content depth {depth}")
            style = _slices(style.expand(batch, *style.shape[1:]))
        elif style.shape[0] == batch:
            style = style.repeat_interleave(depth, dim=0)
        content = _slices(content)

    low, high = extractor.value_range
    out_dtype = content.dtype if content.is_floating_point() else torch.float32
    dtype = content.dtype if content.dtype == torch.float64 else torch.float32
    content = content.detach().to(dtype)
    style = style.detach().to(dtype)
    with torch.no_grad():
        targets = extractor(content, content_layers)
        grams = {layer: gram_matrix(f) for layer, f in extractor(style, style_layers).items()}
    start = (content - low) / (high - low)
    if init == "noise":
        start = torch.rand_like(start)
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    records: list[Tensor] = []
    with torch.enable_grad():
        for _ in range(int(steps)):
            optimizer.zero_grad(set_to_none=True)
            feats = extractor(low + z * (high - low), all_layers)
            # Eq. 1 and Eq. 4-5 per image (sums over elements), then the batch mean
            loss_content = sum(
                0.5 * (feats[layer].float() - targets[layer].float()).square().flatten(1).sum(1)
                for layer in content_layers
            ).mean()
            loss_style = sum(
                0.25 * (gram_matrix(feats[layer]) - grams[layer]).square().flatten(1).sum(1)
                for layer in style_layers
            ).mean() / len(style_layers)
            loss = content_weight * loss_content + style_weight * loss_style
            loss.backward()
            optimizer.step()
            records.append(torch.stack([loss, loss_content, loss_style]).detach())
    result = (low + z.detach() * (high - low)).clamp(low, high).to(out_dtype)
    if len(shape) == 5:
        result = result.view(shape[0], shape[2], *result.shape[1:]).movedim(1, 2)
    if not return_history:
        return result
    table = torch.stack(records).cpu().tolist() if records else []
    history = {
        "total": [row[0] for row in table],
        "content": [row[1] for row in table],
        "style": [row[2] for row in table],
    }
    return result, history


# ---- the AGGrGAN model


def default_members() -> list[dict[str, Any]]:
    """AGGrGAN's three base GANs: two DCGAN variants and a WGAN-GP (configs, 64 px)."""
    dcgan_opt = {"_target_": "torch.optim.Adam", "lr": 2e-4, "betas": [0.5, 0.999]}
    wgan_opt = {"_target_": "torch.optim.Adam", "lr": 1e-4, "betas": [0.0, 0.9]}
    generator = {"_target_": "medgen.nets.DCGANGenerator", "latent_dim": 100}
    return [
        {
            "name": "dcgan",
            "generator": {**generator, "upsample": "transpose"},
            "discriminator": {"_target_": "medgen.nets.DCGANDiscriminator"},
            "optimizer_g": dcgan_opt,
            "optimizer_d": dcgan_opt,
        },
        {
            "name": "dcgan_resize",
            "generator": {**generator, "upsample": "nearest_conv"},
            "discriminator": {"_target_": "medgen.nets.DCGANDiscriminator"},
            "optimizer_g": dcgan_opt,
            "optimizer_d": dcgan_opt,
        },
        {
            "name": "wgan_gp",
            "generator": {**generator, "upsample": "transpose"},
            "discriminator": {"_target_": "medgen.nets.WGANCritic", "norm": "layer"},
            "adv_loss": "wgan",
            "gp_weight": 10.0,
            "n_critic": 5,
            "optimizer_g": wgan_opt,
            "optimizer_d": wgan_opt,
        },
    ]


_MEMBER_KEYS = {
    "name",
    "generator",
    "discriminator",
    "adv_loss",
    "loss",
    "gp_weight",
    "r1_gamma",
    "r1_interval",
    "n_critic",
    "optimizer_g",
    "optimizer_d",
}
_STYLE_KEYS = {
    "weights_path",
    "sha256",
    "arch",
    "content_layers",
    "style_layers",
    "content_weight",
    "style_weight",
    "steps",
    "lr",
}


class AGGrGAN(LatentGANModule):
    """AGGrGAN (Mukherkjee et al., Sci. Rep. 2022): an ensemble of GANs whose outputs are
    selected by SSIM, merged by local sharpness and refined by style transfer.

    The ``K`` member GANs (default: :func:`default_members`, a DCGAN with transposed
    convolutions, a DCGAN with resize-convolutions and a WGAN-GP) train together: every batch is
    one discriminator step of every member, and each member's generator steps after every
    ``n_critic`` of its discriminator steps, with its own losses and optimisers
    (:class:`~medgen.models.gan.AdversarialObjective`). :attr:`generator_steps` and
    :attr:`discriminator_steps` hold one counter per member.

    :meth:`sample` draws one candidate per member for every sample, keeps the best ``k`` by SSIM
    (to reference images when given, by mutual SSIM otherwise; :func:`ssim_select`), merges them
    by sharpness weights (:func:`sharpness_merge`) and, when ``style`` has a VGG-19 weights file,
    refines the merge towards style images (the references by default) with Gatys et al.'s
    style transfer (:func:`style_transfer`). :meth:`write_dataset` writes the result as an
    augmentation folder with a ``selection.csv``. :meth:`from_generators` builds the pipeline
    over separately trained :class:`~medgen.models.GAN` models.

    Args:
        members: Member configs, each a dict with ``name``, ``generator`` and ``discriminator``
            net configs and optionally ``adv_loss`` (``loss`` is its deprecated name), ``gp_weight``, ``r1_gamma``, ``r1_interval``,
            ``n_critic``, ``optimizer_g``, ``optimizer_d`` (as :class:`~medgen.models.GAN`).
        net_defaults: Kwargs added to every member's generator and discriminator unless the
            member sets them: e.g. ``image_size``, and ``image_channels`` (the generators'
            ``out_channels`` and the discriminators' ``in_channels``).
        spatial_dims: 2 or 3.
        k: Candidates kept per sample (AGGrGAN: the best two of three).
        sharpness_sigma: Gaussian smoothing of the Sobel magnitude (AGGrGAN: 2).
        ssim_kernel_size: SSIM window for the selection (odd, at most the image side).
        style: Style transfer settings: ``weights_path`` (local VGG-19/16 torchvision weights;
            without it style transfer is off), ``sha256``, ``arch``, ``content_layers``,
            ``style_layers``, ``content_weight``, ``style_weight``, ``steps``, ``lr`` (see
            :func:`style_transfer`).
        scheduler: Optional scheduler config for every optimiser (stepped per epoch).
        image_key: Key of the images in a batch dict.
        value_range: Data range ``(low, high)`` of the images.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Samples per validation grid.
        val_features_width: Width of the random-conv features of ``val/mmd``.
    """

    export_modules = ("generators",)
    capabilities = frozenset({SAMPLE, WRITE_DATASET})

    def __init__(
        self,
        members: Sequence[Mapping[str, Any]] | None = None,
        net_defaults: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        k: int = 2,
        sharpness_sigma: float = 2.0,
        ssim_kernel_size: int = 11,
        style: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 16,
        val_features_width: int = 16,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer_g=DEFAULT_GAN_OPTIMIZER,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            val_features_width=val_features_width,
        )
        self.save_hyperparameters()
        members = [dict(m) for m in (members or default_members())]
        if not members:
            raise ValueError("AGGrGAN needs at least one member GAN")
        if not 1 <= k <= len(members):
            raise ValueError(f"k must be between 1 and the number of members {len(members)}")
        names = [str(m.get("name", f"member{i}")) for i, m in enumerate(members)]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        defaults = dict(net_defaults or {})
        generators, discriminators, objectives = [], [], []
        for name, member in zip(names, members, strict=True):
            unknown = set(member) - _MEMBER_KEYS
            if unknown:
                raise ValueError(f"member {name!r}: unknown keys {sorted(unknown)}")
            g_conf = {**_net_defaults(defaults, "generator"), **member["generator"]}
            d_conf = {**_net_defaults(defaults, "discriminator"), **member["discriminator"]}
            generators.append(build_net(g_conf, spatial_dims, f"{name}.generator"))
            discriminators.append(build_net(d_conf, spatial_dims, f"{name}.discriminator"))
            objective = AdversarialObjective(
                resolve_adv_loss(member.get("adv_loss"), member.get("loss"), f"{name}.loss"),
                float(member.get("gp_weight", 0.0)),
                float(member.get("r1_gamma", 0.0)),
                int(member.get("r1_interval", 1)),
                int(member.get("n_critic", 1)),
            )
            objective.check_discriminator(discriminators[-1])
            objectives.append(objective)
        sizes = {tuple(getattr(g, "image_size", ())) for g in generators}
        if len(sizes) != 1:
            raise ValueError(f"all member generators must make the same image size, got {sizes}")
        self.member_names = names
        self.members_config = members
        self.generators = nn.ModuleList(generators)
        self.discriminators = nn.ModuleList(discriminators)
        self.objectives = objectives
        self.k = int(k)
        self.sharpness_sigma = float(sharpness_sigma)
        self.ssim_kernel_size = int(ssim_kernel_size)
        self.style_config = dict(style or {})
        unknown = set(self.style_config) - _STYLE_KEYS
        if unknown:
            raise ValueError(f"style: unknown keys {sorted(unknown)}; valid: {sorted(_STYLE_KEYS)}")
        self._style_extractor: VGGFeatures | None = None
        self._warned_no_style = False
        self.num_log_images = num_log_images
        count = len(generators)
        self.register_buffer("generator_steps", zero_step_counter(count))
        self.register_buffer("discriminator_steps", zero_step_counter(count))

    @property
    def style_enabled(self) -> bool:
        """Whether style transfer runs (a VGG weights file is configured)."""
        return bool(self.style_config.get("weights_path"))

    # ----------------------------------------------------------------- training
    def optimizer_groups(self):
        """A G/D optimiser pair per member (generator, discriminator, generator, ...)."""
        groups = []
        for member, g, d in zip(
            self.members_config, self.generators, self.discriminators, strict=True
        ):
            opt_g = member.get("optimizer_g", DEFAULT_GAN_OPTIMIZER)
            groups += [(g.parameters(), opt_g), (d.parameters(), member.get("optimizer_d", opt_g))]
        return groups

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self.check_images(real, self.generators[0])
        real = self.to_net(real)
        optimizers = self.optimizer_list()
        for i, name in enumerate(self.member_names):
            terms = self.update_pair(
                self.generators[i],
                self.discriminators[i],
                self.objectives[i],
                optimizers[2 * i],
                optimizers[2 * i + 1],
                real,
                int(self.discriminator_steps[i]),
            )
            self.discriminator_steps[i] += 1
            if "g_loss" in terms:
                self.count_generator_step(i)
            self.log_dict({f"train/{name}/{k}": v for k, v in terms.items()})
        self.step_schedulers("step")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.check_images(batch[self.image_key], self.generators[0])
        super().validation_step(batch, batch_idx)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def candidates(self, num_samples: int, seed: int | None = None, batch_size: int = 64) -> Tensor:
        """One image per member for each sample: ``(K, N, C, *spatial)`` in data units.

        Member ``i`` draws its latents with seed ``seed + i`` (independent candidates).
        """
        return torch.stack(
            [
                self.run_generator(g, num_samples, None if seed is None else seed + i, batch_size)
                for i, g in enumerate(self.generators)
            ]
        )

    def _extractor(self) -> VGGFeatures:
        if self._style_extractor is None:
            conf = self.style_config
            layers = tuple(conf.get("content_layers", ("relu4_2",))) + tuple(
                conf.get("style_layers", _GATYS_STYLE_LAYERS)
            )
            self._style_extractor = VGGFeatures(
                arch=conf.get("arch", "vgg19"),
                weights_path=conf["weights_path"],
                sha256=conf.get("sha256"),
                layers=tuple(dict.fromkeys(layers)),
                value_range=self.value_range,
            ).to(self.device)
        return self._style_extractor

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        batch_size: int = 64,
        reference: Tensor | None = None,
        style_images: Tensor | None = None,
        return_selection: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """AGGrGAN samples ``(N, C, *spatial)`` in data units.

        Args:
            num_samples: Number of images.
            seed: Seed of the members' latents (``None``: random).
            batch_size: Generator batch size.
            reference: Real images ``(R, C, *spatial)`` in data units; sample ``n`` is scored
                against ``reference[n % R]``. ``None``: mutual SSIM between the candidates.
            style_images: Style targets ``(R', C, *spatial)`` for style transfer (sample ``n``
                uses ``style_images[n % R']``); default: ``reference``. Style transfer runs only
                when ``style.weights_path`` is set and style images are available.
            return_selection: Also return ``{"indices": (k, N), "scores": (K, N)}``.
        """
        candidates = self.candidates(num_samples, seed, batch_size)
        reference = _cycle(reference, num_samples)
        merged, selection = aggregate(
            candidates,
            reference,
            k=self.k,
            sigma=self.sharpness_sigma,
            data_range=self.data_range,
            kernel_size=self.ssim_kernel_size,
        )
        style_images = _cycle(style_images, num_samples) if style_images is not None else reference
        if self.style_enabled and style_images is not None:
            conf = self.style_config
            extractor = self._extractor()
            merged = torch.cat(
                [
                    style_transfer(
                        content.to(self.device),
                        style.to(self.device),
                        extractor,
                        content_layers=tuple(conf.get("content_layers", ("relu4_2",))),
                        style_layers=tuple(conf.get("style_layers", _GATYS_STYLE_LAYERS)),
                        content_weight=float(conf.get("content_weight", 5.0)),
                        style_weight=float(conf.get("style_weight", 10.0)),
                        steps=int(conf.get("steps", 500)),
                        lr=float(conf.get("lr", 0.01)),
                    ).cpu()
                    for content, style in zip(
                        merged.split(batch_size), style_images.split(batch_size), strict=True
                    )
                ]
            )
        elif self.style_enabled and not self._warned_no_style:
            self._warned_no_style = True
            warnings.warn(
                "AGGrGAN: style transfer is configured but no style images were given "
                "(pass reference= or style_images=); returning the merged images (warned once)",
                stacklevel=2,
            )
        if return_selection:
            return merged, selection
        return merged

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        real = batch[self.image_key][: self.num_log_images]
        n = self.num_log_images
        images = {"real": real, "aggregated": self.sample(n, seed=0)}
        for name, member in zip(self.member_names, self.candidates(n, seed=0), strict=True):
            images[f"member_{name}"] = member
        return images

    def write_dataset(
        self,
        folder: str | os.PathLike,
        num_samples: int,
        seed: int = 0,
        reference: Tensor | None = None,
        style_images: Tensor | None = None,
        batch_size: int = 64,
    ) -> list[Path]:
        """Write ``num_samples`` AGGrGAN images to ``folder`` as an augmentation dataset.

        Images are written as by ``medgen-sample`` (16-bit PNG for grey 2D, NIfTI with the
        model's spacing for 3D), plus ``selection.csv``: per file, the members kept (best first)
        and every member's SSIM score.

        Returns:
            The image paths.
        """
        from medgen.data.outputs import write_images
        from medgen.utils.files import atomic_path, ensure_writable_dir

        folder = ensure_writable_dir(folder, "dataset folder")
        images, selection = self.sample(
            num_samples, seed, batch_size, reference, style_images, return_selection=True
        )
        paths = write_images(self, images, folder, prefix="aggrgan")
        indices, scores = selection["indices"].cpu(), selection["scores"].cpu()
        header = ["file", "kept"] + [f"ssim_{name}" for name in self.member_names]
        with atomic_path(folder / "selection.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for n, path in enumerate(paths):
                kept = "+".join(self.member_names[int(i)] for i in indices[:, n])
                writer.writerow(
                    [path.name, kept] + [f"{float(s):.6f}" for s in scores[:, n].tolist()]
                )
        return paths

    @classmethod
    def from_generators(
        cls,
        models: Sequence[str | os.PathLike | GAN],
        names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> AGGrGAN:
        """An AGGrGAN over separately trained GANs (checkpoints, exported folders or modules).

        Each model's generator config and weights (EMA weights for checkpoints with an EMA
        callback) become a member; the discriminators are not needed for sampling. All models
        must share ``spatial_dims`` and ``value_range``.

        Args:
            models: :class:`~medgen.models.GAN` instances or paths for :func:`medgen.load`.
            names: Member names (default: ``member0``, ``member1``, ...).
            **kwargs: Other :class:`AGGrGAN` arguments (``k``, ``style``, ...).
        """
        from medgen.pretrained import load

        loaded = [m if isinstance(m, GAN) else load(m) for m in models]
        for source, model in zip(models, loaded, strict=True):
            if not isinstance(model, GAN):
                raise TypeError(f"{source} holds a {type(model).__name__}, not a medgen GAN")
        first = loaded[0]
        for source, model in zip(models, loaded, strict=True):
            if (model.spatial_dims, model.value_range) != (first.spatial_dims, first.value_range):
                raise ValueError(
                    f"{source}: spatial_dims/value_range {model.spatial_dims}/"
                    f"{model.value_range} differ from the first model's {first.spatial_dims}/"
                    f"{first.value_range}"
                )
        names = list(names or [f"member{i}" for i in range(len(loaded))])
        if len(names) != len(loaded):
            raise ValueError(f"{len(names)} names for {len(loaded)} models")
        members = [
            {
                "name": name,
                "generator": dict(model.hparams["generator"] or DEFAULT_GENERATOR),
                "discriminator": dict(model.hparams["discriminator"] or DEFAULT_DISCRIMINATOR),
                "adv_loss": model.objective.adv_loss,
            }
            for name, model in zip(names, loaded, strict=True)
        ]
        kwargs.setdefault("k", min(2, len(members)))
        ensemble = cls(
            members=members,
            spatial_dims=first.spatial_dims,
            value_range=first.value_range,
            spacing=first.spacing,
            **kwargs,
        )
        for generator, model in zip(ensemble.generators, loaded, strict=True):
            generator.load_state_dict(model.generator.state_dict())
        return ensemble


_GATYS_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def _net_defaults(defaults: Mapping[str, Any], role: str) -> dict[str, Any]:
    """Shared net kwargs for a generator or discriminator; ``image_channels`` becomes the
    generator's ``out_channels`` or the discriminator's ``in_channels``."""
    out = {k: v for k, v in defaults.items() if k != "image_channels"}
    if "image_channels" in defaults:
        key = "out_channels" if role == "generator" else "in_channels"
        out[key] = defaults["image_channels"]
    return out


def _cycle(images: Tensor | None, count: int) -> Tensor | None:
    """``images[n % R]`` for ``n < count``."""
    if images is None:
        return None
    if images.shape[0] == 0:
        raise ValueError("reference/style images are empty")
    return images[torch.arange(count) % images.shape[0]]
