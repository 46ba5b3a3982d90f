"""Adaptive discriminator augmentation (ADA), 2D and 3D.

Karras et al., "Training Generative Adversarial Networks with Limited Data", NeurIPS 2020
(StyleGAN2-ADA). The discriminator sees real *and* generated images through the same random,
differentiable augmentations, each applied with probability ``p``. Because every augmentation is
skipped with probability ``1 - p > 0``, the distribution of augmented images determines the
distribution of clean ones (the augmentation is invertible in distribution, sec. 2): the generator
is only rewarded for matching the clean data, and the augmentations do not "leak" into its samples.
For a flip of probability ``p/2`` (flip with probability ``p``, then left or right with equal odds)
that holds for every ``p < 1``.

``p`` is adjusted every ``interval`` discriminator steps with the overfitting heuristic
``r_t = E[sign(D(x_real))]`` (sec. 3, eq. 1): when ``r_t`` exceeds the target (0.6) the
discriminator is over-confident on the training images and ``p`` rises, otherwise it falls, by
``N / (kimg * 1000)`` per update for the ``N`` images seen since the last one, so that ``p`` can go
from 0 to 1 in ``kimg`` thousand images (500 in the paper).

The operations are those of the paper's "bgc" pipeline that make sense for medical images
(appendix B): x-flip, rotation by multiples of 90°, integer translation, isotropic scaling,
arbitrary rotation, anisotropic scaling, brightness and contrast, plus cutout (DeVries & Taylor,
2017). Colour operations that assume RGB (luma flip, hue, saturation) are left out. The geometric
operations are composed into one affine matrix per sample and applied in a single bilinear warp with
reflection padding: in 2D by :func:`kornia.geometry.transform.warp_affine`, in 3D by our own
:func:`warp_affine` (``F.affine_grid`` + ``F.grid_sample``; kornia's 3D warp has no reflection
padding). Brightness, contrast and cutout are written here (kornia's intensity operations clip to
``[0, 1]``, and our images are in ``[-1, 1]``). Samples whose geometric operations all skipped are
passed through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medgen.nn.factories import check_spatial_dims

__all__ = ["AdaptiveAugment", "sampling_to_normalized", "warp_affine"]

#: Operation names, in the order they are applied, and their default probability multipliers.
OPERATIONS = (
    "xflip",
    "rotate90",
    "xint",
    "scale",
    "rotate",
    "aniso",
    "brightness",
    "contrast",
    "cutout",
)


def sampling_to_normalized(matrix: Tensor, sizes: Sequence[int]) -> Tensor:
    """Convert sampling matrices from centred pixel coordinates to ``affine_grid``'s.

    Args:
        matrix: ``(B, d + 1, d + 1)`` homogeneous matrices mapping output to input positions, in
            pixel units relative to the image centre, coordinates in ``grid_sample`` order (the
            last tensor axis first).
        sizes: Spatial sizes in tensor order ``(H, W)`` / ``(D, H, W)``.

    Returns:
        ``(B, d, d + 1)`` matrices for :func:`torch.nn.functional.affine_grid` with
        ``align_corners=True`` (normalised coordinate ``2 u / (n - 1)``).
    """
    scale = torch.tensor([max(n - 1, 1) / 2.0 for n in reversed(sizes)], dtype=matrix.dtype)
    scale = scale.to(matrix.device)
    d = len(sizes)
    to_pixel = torch.diag(torch.cat([scale, scale.new_ones(1)]))
    to_norm = torch.diag(torch.cat([1.0 / scale, scale.new_ones(1)]))
    return (to_norm @ matrix @ to_pixel)[:, :d]


def warp_affine(x: Tensor, matrix: Tensor) -> Tensor:
    """Resample ``x`` ``(B, C, *spatial)`` with sampling matrices in centred pixel coordinates.

    Bilinear (trilinear in 3D) interpolation with reflection padding; see
    :func:`sampling_to_normalized` for the convention of ``matrix`` ``(B, d + 1, d + 1)``.
    """
    theta = sampling_to_normalized(matrix.to(x.dtype), x.shape[2:])
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)


def _warp_kornia_2d(x: Tensor, matrix: Tensor) -> Tensor:
    """2D warp through kornia (``warp_affine`` takes the forward map in pixel coordinates)."""
    from kornia.geometry.transform import warp_affine as kornia_warp

    h, w = x.shape[2:]
    centre = torch.eye(3, dtype=matrix.dtype, device=matrix.device)
    centre[0, 2], centre[1, 2] = (w - 1) / 2.0, (h - 1) / 2.0
    forward = centre @ torch.linalg.inv(matrix) @ torch.linalg.inv(centre)
    return kornia_warp(
        x, forward[:, :2].to(x.dtype), (h, w), padding_mode="reflection", align_corners=True
    )


def _rotation_2d(angle: Tensor) -> Tensor:
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _rotation_3d(axis: Tensor, angle: Tensor) -> Tensor:
    """Rodrigues' rotation about unit ``axis`` ``(B, 3)`` by ``angle`` ``(B,)``."""
    k = torch.zeros(axis.shape[0], 3, 3, dtype=axis.dtype, device=axis.device)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    eye = torch.eye(3, dtype=axis.dtype, device=axis.device).expand_as(k)
    s, c = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return eye + s * k + (1 - c) * (k @ k)


class AdaptiveAugment(nn.Module):
    """ADA's augmentation pipeline with its adaptive probability ``p`` (2D and 3D).

    Call the module on a batch of images in ``[-1, 1]`` (real or generated, before the
    discriminator). Every operation is applied to every sample independently with probability
    ``p * multiplier`` (``multiplier`` is the operation's keyword; 0 turns it off). In eval mode,
    or with ``p == 0``, the input is returned unchanged. Gradients flow to the input (the
    generator learns through the augmentation).

    The controller: :meth:`observe` accumulates ``sign(D(real))`` of each discriminator step,
    :meth:`step` counts the steps and, every ``interval`` steps, moves ``p`` toward the target
    (:meth:`adjust`). With ``target=None`` ``p`` stays fixed. ``p`` and the accumulators are
    buffers, so a checkpoint resumes the controller exactly.

    Args:
        spatial_dims: 2 or 3.
        p: Initial augmentation probability.
        target: Target of ``r_t = E[sign(D(real))]`` (0.6 in the paper); ``None`` fixes ``p``.
        interval: Discriminator steps between updates of ``p`` (4).
        kimg: Thousands of images for ``p`` to go from 0 to 1 at the maximal rate (500).
        max_p: Upper bound of ``p``.
        xflip: Multiplier of the flip of the last (x) axis (with probability 1/2 when applied).
        rotate90: Multiplier of the rotation by ``k * 90°`` (``k`` uniform in 0..3; in 3D in a
            random plane).
        xint: Multiplier of the integer translation, uniform in ``±xint_max`` of each side.
        scale: Multiplier of the isotropic scaling ``2 ** N(0, scale_std)``.
        rotate: Multiplier of the arbitrary rotation (uniform angle in ``±rotate_max * 180°``;
            in 3D about a random axis). As in the paper it is drawn twice, before and after the
            anisotropic scaling, each time with probability ``1 - sqrt(1 - p)``.
        aniso: Multiplier of the anisotropic scaling ``2 ** N(0, aniso_std)`` of one axis (x in
            2D, a random one in 3D) and the inverse of the others.
        brightness: Multiplier of the additive brightness ``N(0, brightness_std)``.
        contrast: Multiplier of the contrast ``2 ** N(0, contrast_std)`` about each sample's mean.
        cutout: Multiplier of cutout: a box of ``cutout_size`` of each side at a random centre
            filled with ``cutout_fill``.
        xint_max, scale_std, rotate_max, aniso_std, brightness_std, contrast_std, cutout_size,
            cutout_fill: Strengths (the paper's values by default).
        use_kornia: Warp 2D images with kornia (else with :func:`warp_affine`; the two agree).

    Shapes:
        ``(B, C, *spatial) -> (B, C, *spatial)``.
    """

    p: Tensor
    sign_sum: Tensor
    num_observed: Tensor
    steps: Tensor

    def __init__(
        self,
        spatial_dims: int,
        p: float = 0.0,
        target: float | None = 0.6,
        interval: int = 4,
        kimg: float = 500.0,
        max_p: float = 1.0,
        xflip: float = 1.0,
        rotate90: float = 1.0,
        xint: float = 1.0,
        scale: float = 1.0,
        rotate: float = 1.0,
        aniso: float = 1.0,
        brightness: float = 1.0,
        contrast: float = 1.0,
        cutout: float = 0.0,
        xint_max: float = 0.125,
        scale_std: float = 0.2,
        rotate_max: float = 1.0,
        aniso_std: float = 0.2,
        brightness_std: float = 0.2,
        contrast_std: float = 0.5,
        cutout_size: float = 0.5,
        cutout_fill: float = 0.0,
        use_kornia: bool = True,
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if not 0.0 <= p <= max_p <= 1.0:
            raise ValueError(f"need 0 <= p <= max_p <= 1, got p={p}, max_p={max_p}")
        if interval < 1 or kimg <= 0:
            raise ValueError(f"interval must be >= 1 and kimg > 0, got {interval}, {kimg}")
        self.target = target
        self.interval = int(interval)
        self.kimg = float(kimg)
        self.max_p = float(max_p)
        self.multipliers = {
            "xflip": xflip,
            "rotate90": rotate90,
            "xint": xint,
            "scale": scale,
            "rotate": rotate,
            "aniso": aniso,
            "brightness": brightness,
            "contrast": contrast,
            "cutout": cutout,
        }
        for name, value in self.multipliers.items():
            if value < 0:
                raise ValueError(f"the probability multiplier {name}={value} must be >= 0")
        self.xint_max = xint_max
        self.scale_std = scale_std
        self.rotate_max = rotate_max
        self.aniso_std = aniso_std
        self.brightness_std = brightness_std
        self.contrast_std = contrast_std
        self.cutout_size = cutout_size
        self.cutout_fill = cutout_fill
        self.use_kornia = use_kornia
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("sign_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def adaptive(self) -> bool:
        """Whether ``p`` follows the overfitting heuristic (a target is set)."""
        return self.target is not None

    # ------------------------------------------------------------------ controller
    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        """Accumulate ``sign(D(real))`` of one discriminator step (one value per sample)."""
        signs = real_logits.detach().double().sign().flatten(1).mean(1)
        self.sign_sum += signs.sum()
        self.num_observed += signs.numel()

    @torch.no_grad()
    def step(self, reduce: Callable[[Tensor], Tensor] | None = None) -> float | None:
        """Count a discriminator step; every ``interval`` steps adjust ``p`` and return ``r_t``.

        Args:
            reduce: Sums a tensor over DDP ranks (e.g. ``strategy.reduce(t, reduce_op="sum")``),
                so every rank takes the same step with the statistics of the whole batch.
        """
        self.steps += 1
        if not self.adaptive or int(self.steps) % self.interval:
            return None
        stats = torch.stack([self.sign_sum, self.num_observed])
        if reduce is not None:
            stats = reduce(stats)
        return self.adjust(float(stats[0]), float(stats[1]))

    @torch.no_grad()
    def adjust(self, sign_sum: float, count: float) -> float | None:
        """Move ``p`` by ``sign(r_t - target) * count / (kimg * 1000)``; reset the accumulators.

        ``sign_sum`` and ``count`` may be summed over DDP ranks by the caller.

        Returns:
            ``r_t = sign_sum / count`` (``None`` when nothing was observed).
        """
        self.sign_sum.zero_()
        self.num_observed.zero_()
        if count <= 0 or self.target is None:
            return None
        r_t = sign_sum / count
        delta = math.copysign(1.0, r_t - self.target) * count / (self.kimg * 1000.0)
        if r_t == self.target:
            delta = 0.0
        self.p.copy_((self.p + delta).clamp(0.0, self.max_p))
        return r_t

    # ------------------------------------------------------------------ augmentation
    def _gate(self, name: str, batch: int, device: torch.device, p: float | None = None) -> Tensor:
        prob = (float(self.p) if p is None else p) * self.multipliers[name]
        return torch.rand(batch, device=device) < prob

    def geometric_matrix(self, x: Tensor) -> Tensor:
        """Random sampling matrices ``(B, d + 1, d + 1)`` (centred pixel units, grid order)."""
        batch, d, device = x.shape[0], self.spatial_dims, x.device
        sizes = list(reversed(x.shape[2:]))  # grid order: x (last axis) first
        dtype = torch.float32
        eye = torch.eye(d + 1, dtype=dtype, device=device)
        m = eye.repeat(batch, 1, 1)

        def compose(mask: Tensor, linear: Tensor | None = None, shift: Tensor | None = None):
            nonlocal m
            t = eye.repeat(batch, 1, 1)
            if linear is not None:
                t[:, :d, :d] = linear
            if shift is not None:
                t[:, :d, d] = shift
            t = torch.where(mask[:, None, None], t, eye)
            m = m @ t

        if self.multipliers["xflip"]:
            flip = self._gate("xflip", batch, device) & (torch.rand(batch, device=device) < 0.5)
            lin = eye[:d, :d].repeat(batch, 1, 1)
            lin[:, 0, 0] = -1.0
            compose(flip, lin)
        if self.multipliers["rotate90"]:
            gate = self._gate("rotate90", batch, device)
            k = torch.randint(0, 4, (batch,), device=device)
            planes = [(a, b) for a in range(d) for b in range(a + 1, d)]
            plane = torch.randint(0, len(planes), (batch,), device=device)
            lin = eye[:d, :d].repeat(batch, 1, 1)
            for index, (a, b) in enumerate(planes):
                # Quarter turns only where the plane is square; else half turns (k in {0, 2}).
                kk = k if sizes[a] == sizes[b] else (k // 2) * 2
                angle = kk.to(dtype) * (math.pi / 2)
                rot = _rotation_2d(angle).round()
                sel = plane == index
                sub = lin[sel]
                sub[:, a, a], sub[:, a, b] = rot[sel, 0, 0], rot[sel, 0, 1]
                sub[:, b, a], sub[:, b, b] = rot[sel, 1, 0], rot[sel, 1, 1]
                lin[sel] = sub
            compose(gate, lin)
        if self.multipliers["xint"]:
            gate = self._gate("xint", batch, device)
            size = torch.tensor(sizes, dtype=dtype, device=device)
            shift = ((torch.rand(batch, d, device=device) * 2 - 1) * self.xint_max * size).round()
            compose(gate, shift=shift)
        if self.multipliers["scale"]:
            gate = self._gate("scale", batch, device)
            s = torch.exp2(torch.randn(batch, device=device) * self.scale_std)
            compose(gate, torch.diag_embed(s[:, None].expand(batch, d)))
        p_rot = 1.0 - math.sqrt(max(0.0, 1.0 - float(self.p)))
        for second in (False, True):
            if not self.multipliers["rotate"]:
                break
            gate = self._gate("rotate", batch, device, p_rot)
            angle = (torch.rand(batch, device=device) * 2 - 1) * math.pi * self.rotate_max
            if d == 2:
                lin = _rotation_2d(angle)
            else:
                axis = F.normalize(torch.randn(batch, 3, device=device), dim=1)
                lin = _rotation_3d(axis, angle)
            compose(gate, lin)
            if not second and self.multipliers["aniso"]:
                gate = self._gate("aniso", batch, device)
                s = torch.exp2(torch.randn(batch, device=device) * self.aniso_std)
                axis = (
                    torch.zeros(batch, dtype=torch.long, device=device)
                    if d == 2
                    else torch.randint(0, d, (batch,), device=device)
                )
                one_hot = F.one_hot(axis, d).to(dtype)
                # s on the chosen axis, s ** (-1 / (d - 1)) on the others: volume kept.
                diag = torch.exp2(torch.log2(s)[:, None] * (one_hot - (1 - one_hot) / (d - 1)))
                compose(gate, torch.diag_embed(diag))
        return m

    def _warp(self, x: Tensor, matrix: Tensor) -> Tensor:
        if self.spatial_dims == 2 and self.use_kornia:
            return _warp_kornia_2d(x, matrix)
        return warp_affine(x, matrix)

    def forward(self, x: Tensor) -> Tensor:
        """Augment a batch ``(B, C, *spatial)`` (a no-op in eval mode or with ``p == 0``)."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"AdaptiveAugment(spatial_dims={self.spatial_dims}) expects (B, C, *spatial), "
                f"got {tuple(x.shape)}"
            )
        if not self.training or float(self.p) <= 0.0:
            return x
        batch, device = x.shape[0], x.device
        matrix = self.geometric_matrix(x)
        eye = torch.eye(self.spatial_dims + 1, device=device)
        moved = (matrix - eye).abs().flatten(1).amax(1) > 1e-6
        if bool(moved.any()):
            index = moved.nonzero().squeeze(1)
            warped = self._warp(x[index], matrix[index])
            x = x.index_copy(0, index, warped.to(x.dtype))
        shape = (batch,) + (1,) * (x.ndim - 1)
        if self.multipliers["brightness"]:
            gate = self._gate("brightness", batch, device).reshape(shape)
            b = torch.randn(shape, device=device) * self.brightness_std
            x = x + torch.where(gate, b, torch.zeros_like(b)).to(x.dtype)
        if self.multipliers["contrast"]:
            gate = self._gate("contrast", batch, device).reshape(shape)
            c = torch.exp2(torch.randn(shape, device=device) * self.contrast_std)
            c = torch.where(gate, c, torch.ones_like(c)).to(x.dtype)
            mean = x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)
            x = (x - mean) * c + mean
        if self.multipliers["cutout"]:
            gate = self._gate("cutout", batch, device)
            centre = torch.rand(batch, self.spatial_dims, device=device)
            inside = torch.ones(shape, device=device, dtype=torch.bool)
            for axis, n in enumerate(x.shape[2:]):
                coords = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
                near = (coords[None] - centre[:, axis : axis + 1]).abs() < self.cutout_size / 2
                view = [batch, 1] + [1] * self.spatial_dims
                view[2 + axis] = n
                inside = inside & near.reshape(view)
            keep = ~(inside & gate.reshape(shape))
            x = torch.where(keep, x, torch.full_like(x, self.cutout_fill))
        return x

    def extra_repr(self) -> str:
        on = ", ".join(f"{k}={v:g}" for k, v in self.multipliers.items() if v)
        return (
            f"spatial_dims={self.spatial_dims}, p={float(self.p):.4f}, target={self.target}, "
            f"interval={self.interval}, kimg={self.kimg:g}, {on}"
        )
