"""The phantom datasets: images (:class:`PhantomDataset`), pairs (:class:`PairedPhantomDataset`)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .anatomy import as_size, check_ids, contrast_table, evaluate, head_phantom, lesion_count, shade
from .degradations import defocus, rician, stain_rgb, stain_textures

_F32 = np.float32


class PhantomDataset(Dataset):
    """A map-style dataset of procedural head phantoms.

    Item ``i`` is the phantom of subject ``(seed, offset + i)``: a subject always has the same
    anatomy, whatever ``contrast``, ``size`` or ``length``. Give training and validation sets
    disjoint index ranges (e.g. ``offset=0, length=256`` and ``offset=256, length=64``) so that no
    subject is in both; the same ``seed`` and ``offset`` with two contrasts give paired data.

    Args:
        spatial_dims: 2 for axial slices, 3 for volumes.
        size: grid size, one int for every axis or one per axis.
        length: number of subjects.
        seed: dataset seed.
        contrast: a key of :data:`CONTRASTS`.
        lesions: white-matter lesion count: an int, or an inclusive ``(low, high)`` range.
        noise_std: Rician-like noise level (see :func:`head_phantom`).
        bias_field: multiplicative bias-field amplitude (see :func:`head_phantom`).
        offset: index of the first subject.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        size: int | Sequence[int] = 64,
        length: int = 256,
        seed: int = 0,
        contrast: str = "t1",
        lesions: int | tuple[int, int] = (0, 3),
        noise_std: float = 0.0,
        bias_field: float = 0.0,
        offset: int = 0,
    ):
        contrast_table(contrast)
        self.size = as_size(spatial_dims, size)
        self.length, self.offset = operator.index(length), operator.index(offset)
        self.seed = check_ids(seed, self.offset)[0]
        if self.length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        lesion_count(lesions, np.random.default_rng(0))  # validates early
        if not noise_std >= 0 or not bias_field >= 0:
            raise ValueError(
                f"noise_std and bias_field must be non-negative, got {noise_std}, {bias_field}"
            )
        self.spatial_dims = spatial_dims
        self.contrast = contrast
        self.lesions = lesions if isinstance(lesions, int) else tuple(lesions)
        self.noise_std = float(noise_std)
        self.bias_field = float(bias_field)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        """Returns ``{"image": (1, *size) float32 tensor, "index": subject index}``."""
        i = operator.index(i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a PhantomDataset of length {self.length}")
        index = self.offset + i
        image = head_phantom(
            self.spatial_dims,
            self.size,
            index=index,
            seed=self.seed,
            contrast=self.contrast,
            lesions=self.lesions,
            noise_std=self.noise_std,
            bias_field=self.bias_field,
        )
        return {"image": image, "index": index}


#: Kinds of pair produced by :class:`PairedPhantomDataset`.
PAIRS: tuple[str, ...] = ("contrast", "defocus", "stain")


class PairedPhantomDataset(Dataset):
    """A map-style dataset of aligned image pairs for image-to-image translation.

    Item ``i`` shows subject ``(seed, offset + i)`` twice, pixel-aligned:

    - ``pair="contrast"``: ``a`` in MR contrast ``source``, ``b`` in ``target`` (e.g. T1 → T2),
      one label map (see :func:`head_phantom`); ``(1, *size)`` each.
    - ``pair="defocus"``: ``a`` the ``source`` contrast blurred by :func:`defocus` (disk of radius
      ``strength`` pixels), ``b`` the same image in focus -- the restoration direction, as in
      COMI; ``(1, *size)``. Noise, if any, is drawn independently for each.
    - ``pair="stain"``: ``a`` an H&E-like, ``b`` an IHC-like colouring of one section (see
      :func:`stain_phantom`), as in BCI; ``(3, *size)`` in ``[0, 1]``. ``source`` and ``target``
      are not used.

    Args:
        spatial_dims: 2 or 3.
        size: grid size, one int for every axis or one per axis.
        length: number of subjects.
        seed: dataset seed.
        pair: ``"contrast"``, ``"defocus"`` or ``"stain"``.
        source: contrast of ``a`` (and of both images of a defocus pair).
        target: contrast of ``b`` in a contrast pair.
        strength: defocus disk radius in pixels.
        offset: index of the first subject (disjoint ranges for disjoint splits).
        lesions: white-matter lesion count: an int, or an inclusive ``(low, high)`` range.
        noise_std: noise level (Rician for MR-like images, additive Gaussian for stains).
        unpaired: show ``b`` of another subject (``(i + length // 2) % length``), so the pairs
            are not aligned: training data for unpaired methods such as CycleGAN.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        size: int | Sequence[int] = 64,
        length: int = 256,
        seed: int = 0,
        pair: str = "contrast",
        source: str = "t1",
        target: str = "t2",
        strength: float = 2.0,
        offset: int = 0,
        lesions: int | tuple[int, int] = (0, 3),
        noise_std: float = 0.0,
        unpaired: bool = False,
    ):
        if pair not in PAIRS:
            raise ValueError(f"unknown pair kind {pair!r}; valid kinds are: {', '.join(PAIRS)}")
        if pair in ("contrast", "defocus"):
            contrast_table(source)
        if pair == "contrast":
            contrast_table(target)
        strength = float(strength)
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"strength must be a non-negative number of pixels, got {strength}")
        self.size = as_size(spatial_dims, size)
        self.length, self.offset = operator.index(length), operator.index(offset)
        self.seed = check_ids(seed, self.offset)[0]
        if self.length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        lesion_count(lesions, np.random.default_rng(0))  # validates early
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}")
        self.spatial_dims = spatial_dims
        self.pair, self.source, self.target = pair, source, target
        self.strength = strength
        self.lesions = lesions if isinstance(lesions, int) else tuple(lesions)
        self.noise_std = float(noise_std)
        self.unpaired = bool(unpaired)

    @property
    def channels(self) -> int:
        """Channels of ``a`` and ``b``: 3 for stain pairs, else 1."""
        return 3 if self.pair == "stain" else 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        """Returns ``{"a": (C, *size), "b": (C, *size), "index": subject index}`` (float32)."""
        i = operator.index(i)
        if not 0 <= i < self.length:
            raise IndexError(
                f"index {i} out of range for a PairedPhantomDataset of length {self.length}"
            )
        index = self.offset + i
        a, b = self._images(index)
        if self.unpaired and self.length > 1:
            b = self._images(self.offset + (i + self.length // 2) % self.length)[1]
        return {
            "a": torch.from_numpy(np.ascontiguousarray(a, dtype=_F32)),
            "b": torch.from_numpy(np.ascontiguousarray(b, dtype=_F32)),
            "index": index,
        }

    def _images(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The aligned ``(a, b)`` arrays of subject ``index``."""
        seed, dims = self.seed, self.spatial_dims
        ph = evaluate(dims, self.size, index, seed, self.lesions, smooth=True)
        if self.pair == "contrast":
            a = shade(ph, self.source, seed, index, dims, self.noise_std, 0.0)
            b = shade(ph, self.target, seed, index, dims, self.noise_std, 0.0)
        elif self.pair == "defocus":
            sharp = shade(ph, self.source, seed, index, dims, 0.0, 0.0)
            blurred = defocus(torch.from_numpy(sharp), self.strength).numpy()
            a, b = blurred, sharp
            if self.noise_std > 0:
                a = rician(a, self.noise_std, np.random.default_rng([seed, index, 6, dims, 0]))
                b = rician(b, self.noise_std, np.random.default_rng([seed, index, 6, dims, 1]))
        else:
            parts = stain_textures(ph, seed, index, dims)
            a = stain_rgb(ph, "he", seed, index, dims, self.noise_std, parts)
            b = stain_rgb(ph, "ihc", seed, index, dims, self.noise_std, parts)
        return a, b
