"""Paired variants of one phantom's anatomy: defocus, stain colourings and noise.

:func:`defocus` blurs an image as an out-of-focus optical system would; :func:`stain_phantom`
renders the anatomy as an H&E-like or IHC-like stained section; :func:`rician` adds MR
magnitude noise. (The MR contrasts themselves are :data:`~medgen.data.phantoms.CONTRASTS`.)
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .anatomy import Phantom, Tissue, check_ids, evaluate, tissue_table, wave_sum

_F32 = np.float32

#: Kinds of point-spread function understood by :func:`defocus`.
PSFS: tuple[str, ...] = ("disk", "gaussian")


def disk_kernel(spatial_dims: int, radius: float) -> np.ndarray:
    """A disk (2D) or ball (3D) of ``radius`` pixels, anti-aliased, summing to 1.

    Each weight is the fraction of its pixel inside the disk, estimated on a regular sub-pixel
    grid (16 per axis in 2D, 8 in 3D), so the kernel changes continuously with ``radius``.
    """
    half = math.ceil(radius)
    sub = 16 if spatial_dims == 2 else 8
    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    axis = (np.arange(-half, half + 1)[:, None] + offsets[None, :]).reshape(-1)  # (K * sub,)
    grids = np.meshgrid(*([axis] * spatial_dims), indexing="ij")
    inside = sum(g * g for g in grids) <= radius * radius
    k = 2 * half + 1
    coverage = inside.reshape(sum(((k, sub) for _ in range(spatial_dims)), ()))
    coverage = coverage.mean(axis=tuple(range(1, 2 * spatial_dims, 2)))
    if coverage.sum() == 0:  # radius below the sub-pixel grid: a delta
        coverage[(half,) * spatial_dims] = 1.0
    return coverage / coverage.sum()


def _gauss_kernel(sigma: float) -> np.ndarray:
    half = max(1, math.ceil(3.0 * sigma))
    x = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def convolve(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Convolves each of the ``N`` images ``(N, *spatial)`` with a centred ``kernel``.

    ``kernel`` has one (odd) extent per spatial axis; a separable pass gives it extent 1 along
    the other axes. Borders are reflected (replicated when the image is smaller than the kernel).
    """
    spatial_dims = x.ndim - 1
    conv = F.conv2d if spatial_dims == 2 else F.conv3d
    half = [s // 2 for s in kernel.shape]
    pad = [p for h in reversed(half) for p in (h, h)]
    fits = all(h < n for h, n in zip(half, x.shape[-len(half) :], strict=True))
    padded = F.pad(x[:, None], pad, mode="reflect" if fits else "replicate")
    weight = torch.as_tensor(kernel, dtype=x.dtype, device=x.device)[None, None]
    return conv(padded, weight)[:, 0]


def defocus(
    image: torch.Tensor,
    strength: float,
    kind: str = "disk",
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Blurs an image as an out-of-focus optical system would: a deterministic low-pass filter.

    In geometric optics a point out of the focal plane images as a uniform disk (the circle of
    confusion), so ``kind="disk"`` convolves with a disk of radius ``strength`` pixels (a ball in
    3D); ``kind="gaussian"`` uses a Gaussian of standard deviation ``strength`` pixels, the usual
    smoother approximation. Such blurred/sharp pairs are what defocus-correction networks learn
    from, as in COMI (Zhang et al., "Correction of out-of-focus microscopic images by deep
    learning", Comput. Struct. Biotechnol. J. 20, 2022). Both kernels sum to 1 and the borders are
    reflected, so the mean intensity is kept (exactly, up to rounding, away from the borders) and
    non-negative images stay non-negative.

    Args:
        image: ``(C, H, W)`` or ``(C, D, H, W)`` (more leading axes with ``spatial_dims``).
        strength: disk radius or Gaussian sigma in pixels; 0 returns a copy.
        kind: ``"disk"`` or ``"gaussian"``.
        spatial_dims: 2 or 3; by default ``image.ndim - 1``. Give it for batches
            ``(B, C, *spatial)``.

    Returns:
        The blurred image, same shape and dtype (float32 for integer input).

    Raises:
        ValueError: unknown ``kind``, negative or non-finite ``strength``, or a bad shape.
    """
    if kind not in PSFS:
        raise ValueError(f"unknown defocus kind {kind!r}; valid kinds are: {', '.join(PSFS)}")
    strength = float(strength)
    if not (math.isfinite(strength) and strength >= 0):
        raise ValueError(f"strength must be a non-negative number of pixels, got {strength}")
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(image)
    if spatial_dims is None:
        spatial_dims = image.ndim - 1
    if spatial_dims not in (2, 3) or image.ndim < spatial_dims + 1:
        raise ValueError(
            "defocus expects a channel-first (C, H, W) or (C, D, H, W) image (or spatial_dims "
            f"for more leading axes), got shape {tuple(image.shape)}"
        )
    if strength == 0:
        return image.clone()
    dtype = image.dtype if image.is_floating_point() else torch.float32
    spatial = image.shape[image.ndim - spatial_dims :]
    x = image.reshape(-1, *spatial).to(dtype)
    if kind == "disk":
        x = convolve(x, disk_kernel(spatial_dims, strength))
    else:  # separable: one 1D pass per axis
        g = _gauss_kernel(strength)
        for axis in range(spatial_dims):
            shape = [1] * spatial_dims
            shape[axis] = g.size
            x = convolve(x, g.reshape(shape))
    return x.reshape(image.shape).to(image.dtype if image.is_floating_point() else dtype)


#: Stain names understood by :func:`stain_phantom`.
STAINS: tuple[str, ...] = ("he", "ihc")

# Optical density (per unit concentration) of haematoxylin, eosin and DAB in the R, G and B
# channels: the stain vectors of Ruifrok & Johnston (2001), unit length (also skimage's hed).
_STAIN_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAIN_OD /= np.linalg.norm(_STAIN_OD, axis=1, keepdims=True)

# Per-tissue concentrations (BG, scalp, skull, CSF, GM, WM, ventricle, lesion). Nuclei are placed
# with a per-pixel probability (cellularity); lesions are hypercellular, CSF spaces empty.
_EOSIN = tissue_table([0.0, 0.32, 0.60, 0.02, 0.20, 0.30, 0.01, 0.24])
_HAEM_MATRIX = tissue_table([0.0, 0.08, 0.05, 0.0, 0.16, 0.07, 0.0, 0.20])  # faint, outside nuclei
_CELLULARITY = tissue_table([0.0, 0.015, 0.006, 0.0, 0.04, 0.012, 0.0, 0.09])
# IHC: DAB in "positive" tissue (grey matter, e.g. a neuronal marker, and lesions, e.g. a marker of
# proliferating cells), nearly none elsewhere; the counterstain is a lighter haematoxylin.
_DAB = tissue_table([0.0, 0.0, 0.0, 0.0, 0.55, 0.03, 0.0, 0.95])
_NUCLEUS_RADIUS = 1.5  # pixels
_NUCLEUS_H = {"he": 1.1, "ihc": 0.8}  # haematoxylin in a nucleus
_MATRIX_H = {"he": 0.6, "ihc": 0.9}  # scale of the matrix haematoxylin
_POSITIVE = (Tissue.GREY_MATTER, Tissue.LESION)


def _mix(ph: Phantom, values: dict[Tissue, float]) -> np.ndarray:
    """Per-voxel value of a tissue property, weighted by the soft memberships (flat float32)."""
    out = sum(m * _F32(values[t]) for t, m in ph.outer.items())
    out[ph.b_idx] += sum(m * _F32(values[t]) for t, m in ph.inner.items())
    return out


def stain_textures(
    ph: Phantom, seed: int, index: int, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray]:
    """The stain-independent parts of a section: nuclei (a soft mask) and a fibre texture.

    Drawn from ``(seed, index)`` only, so the H&E and IHC renderings of one subject show the very
    same cells (a restained section, pixel-aligned).
    """
    rng = np.random.default_rng([seed, index, 3, spatial_dims])
    size = ph.size
    seeds = rng.random(ph.frame.n, dtype=np.float32) < _mix(ph, _CELLULARITY)
    seeds = torch.from_numpy(seeds.reshape(1, *size).astype(np.float32))
    disk = disk_kernel(spatial_dims, _NUCLEUS_RADIUS)
    # the disk sums to 1: scale so that a lone nucleus is 1 at its centre, then saturate overlaps
    nuclei = convolve(seeds, disk / disk.max()).clamp_(0.0, 1.0).numpy().reshape(-1)
    fibres = rng.standard_normal(ph.frame.n, dtype=np.float32).reshape(1, *size)
    fibres = defocus(torch.from_numpy(fibres), 0.8, kind="gaussian").numpy().reshape(-1)
    fibres *= _F32(1.0 / max(float(fibres.std()), 1e-6))
    return nuclei, fibres


def stain_rgb(
    ph: Phantom,
    stain: str,
    seed: int,
    index: int,
    spatial_dims: int,
    noise_std: float,
    parts: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Renders an evaluated phantom as a stained section: float32 ``(3, *size)`` in ``[0, 1]``."""
    nuclei, fibres = parts if parts is not None else stain_textures(ph, seed, index, spatial_dims)
    anat, frame = ph.anat, ph.frame
    idx, inside = frame.subset(ph.fields["head"][0] < frame.pad)
    texture = np.zeros(frame.n, dtype=_F32)
    texture[idx] = wave_sum(inside.p, anat.tex_k, anat.tex_phase)
    # Slide-to-slide variability of the staining: one factor per stain, per subject and stain.
    rng = np.random.default_rng([seed, index, 4, spatial_dims, zlib.crc32(stain.encode())])
    gain = rng.uniform(0.85, 1.15, 3).astype(_F32)

    tissue = _mix(ph, {t: float(t != Tissue.BACKGROUND) for t in Tissue})
    grain = np.clip(1.0 + 0.12 * texture + 0.10 * fibres, 0.5, 1.5).astype(_F32)
    haem = _F32(_MATRIX_H[stain]) * _mix(ph, _HAEM_MATRIX) * grain
    haem += _F32(_NUCLEUS_H[stain]) * nuclei * tissue
    conc = [haem]
    if stain == "he":
        conc.append(_mix(ph, _EOSIN) * grain * (1.0 - 0.6 * nuclei))
        conc.append(np.zeros_like(haem))
    else:
        # DAB sits in the cytoplasm around positive nuclei, granular, fainter between cells.
        halo = defocus(torch.from_numpy(nuclei.reshape(1, *ph.size)), 1.5, kind="gaussian")
        halo = halo.numpy().reshape(-1)
        halo *= _F32(1.0 / max(float(halo.max()), 1e-6))
        conc.append(np.zeros_like(haem))
        conc.append(_mix(ph, _DAB) * grain * (0.55 + 0.9 * halo) * (1.0 - 0.5 * nuclei))
    # Beer-Lambert: transmitted light exp(-sum_i c_i * od_i) per channel (colour deconvolution
    # model of Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23(4), 2001).
    od = np.stack(conc) * gain[:, None]  # (3 stains, N)
    rgb = np.exp(-(_STAIN_OD.T.astype(_F32) @ od))  # (3 channels, N)
    if noise_std > 0:
        noise_rng = np.random.default_rng(
            [seed, index, 5, spatial_dims, zlib.crc32(stain.encode())]
        )
        rgb += noise_rng.standard_normal(rgb.shape, dtype=_F32) * _F32(noise_std)
    return np.clip(rgb, 0.0, 1.0).astype(_F32).reshape(3, *ph.size)


def _check_stain(stain: str) -> str:
    if stain not in STAINS:
        raise ValueError(f"unknown stain {stain!r}; valid stains are: {', '.join(STAINS)}")
    return stain


def stain_phantom(
    spatial_dims: int,
    size: int | Sequence[int],
    index: int = 0,
    seed: int = 0,
    stain: str = "he",
    lesions: int | tuple[int, int] = (0, 3),
    noise_std: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Renders the anatomy of one head phantom as a stained histology-like section (RGB).

    The tissue is the label map of :func:`head_phantom_labels` for the same ``(seed, index)``,
    seen as a section on a white slide. Each stain has a concentration per tissue, and the colour
    follows the colour-deconvolution model of Ruifrok & Johnston (2001): Beer-Lambert absorption,
    ``rgb = exp(-sum_i c_i * od_i)`` with ``od_i`` the optical-density vector of stain ``i``
    (haematoxylin, eosin, DAB):

    - ``"he"``: H&E -- haematoxylin (blue-purple) nuclei scattered with a tissue-dependent density
      (dense in grey matter and lesions, none in CSF), eosin (pink) cytoplasm and matrix, strong in
      bone and white matter;
    - ``"ihc"``: immunohistochemistry -- DAB (brown) in the *positive* tissue, grey matter and
      (strongly) lesions, on a light haematoxylin counterstain.

    The nuclei and textures depend only on ``(seed, index)``, so the two stains of one subject
    are pixel-aligned: an H&E→IHC pair like those of BCI (Liu et al., "BCI: Breast cancer
    immunohistochemical image generation through pyramid pix2pix", CVPR Workshops 2022), which
    are consecutive sections. Each stain's overall strength varies by ±15% per subject.

    Args:
        spatial_dims: 2 for a section, 3 for a stack of sections.
        size: grid size, one int for every axis or one per axis.
        index: subject index (non-negative).
        seed: dataset seed (non-negative).
        stain: ``"he"`` or ``"ihc"``.
        lesions: white-matter lesion count: an int, or an inclusive ``(low, high)`` range.
        noise_std: standard deviation of additive Gaussian noise per RGB channel (then clipped).
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``(3, *size)`` (RGB) with values in ``[0, 1]``.

    Raises:
        ValueError: unknown stain or another bad argument.
    """
    _check_stain(stain)
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    ph = evaluate(spatial_dims, size, index, seed, lesions, smooth=True)
    seed, index = check_ids(seed, index)
    rgb = stain_rgb(ph, stain, seed, index, spatial_dims, float(noise_std))
    return torch.from_numpy(rgb).to(dtype)


def rician(image: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise (as :func:`head_phantom`), clipped."""
    noise = rng.standard_normal((2, *image.shape), dtype=_F32) * _F32(noise_std)
    return np.clip(np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2), 0.0, 1.0)
