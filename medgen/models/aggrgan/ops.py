"""AGGrGAN's image operations: SSIM selection, sharpness-weighted merging, style transfer.

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

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medgen.losses.perceptual import LayerSpec, VGGFeatures, gram_matrix
from medgen.metrics.pairwise import ssim


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
