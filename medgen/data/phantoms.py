"""Procedural 2D and 3D MR-like head phantoms: the embedded default dataset of medgen.

Every phantom is drawn from a random *anatomy* that depends only on ``(seed, index)``: an
ellipsoidal head (random axes, a slightly egg-shaped outline, small rotation and offset) with a
scalp shell, a skull shell with a marrow-filled diploe, subarachnoid CSF, a folded grey-matter
cortical ribbon with sulci and an interhemispheric fissure, white matter, deep grey matter (caudate
heads and thalami), two mirror-symmetric lateral ventricles and a few small ellipsoidal
white-matter lesions. A 2D phantom is an axial slice through such a head at the level of the
lateral ventricles.

Geometry is analytic in normalised image coordinates ``[-1, 1]`` (one unit is half the field of
view along each axis), so any grid size, isotropic or not, samples the same anatomy. Each structure
has an approximate signed distance (its level-set value over the norm of its analytic gradient),
combined by min/max as in constructive solid geometry. The label map takes the sign of those
distances; the image takes a smoothstep of the distance measured *in voxels* along the boundary
normal, which gives partial-volume edges about one voxel wide at any resolution.

Axes: a 3D volume ``(D, H, W)`` runs inferior → superior along axis 0, anterior → posterior along
axis 1 (the face is at row 0) and across the head along axis 2; a 2D image ``(H, W)`` is an axial
slice with the same rows and columns, so ``volume[k]`` for ``k`` a little above ``D // 2`` looks
like a 2D phantom.

Paired variants for image-to-image translation (:class:`PairedPhantomDataset`) come from the same
anatomy: two MR contrasts; an image and its out-of-focus version (:func:`defocus`); and an H&E-like
and an IHC-like colouring of the tissue as a stained section (:func:`stain_phantom`).

Nothing in MONAI or torchio draws MR-like head anatomy (MONAI's ``create_test_image_3d`` draws
random balls), hence this module.

Randomness comes only from ``numpy.random.default_rng`` streams seeded with ``[seed, index, ...]``;
no global NumPy or torch RNG state is read or changed, so a phantom is bit-identical on every call
and in every process (on one platform). The arithmetic is vectorised NumPy in float32, which has a
much lower per-operation overhead than torch on small grids; the results are returned as tensors.

Example::

    from medgen.data.phantoms import (
        PairedPhantomDataset, PhantomDataset, head_phantom, head_phantom_labels, stain_phantom
    )

    t1 = head_phantom(2, 128, index=3)                   # (1, 128, 128) in [0, 1]
    t2 = head_phantom(2, 128, index=3, contrast="t2")     # same anatomy, paired with t1
    labels = head_phantom_labels(3, (48, 64, 64), index=3)
    train = PhantomDataset(spatial_dims=3, size=32, length=100, offset=0)
    val = PhantomDataset(spatial_dims=3, size=32, length=20, offset=100)  # disjoint subjects
    he, ihc = stain_phantom(2, 128, index=3), stain_phantom(2, 128, index=3, stain="ihc")
    pairs = PairedPhantomDataset(spatial_dims=2, size=64, pair="defocus", strength=2.0)
"""

from __future__ import annotations

import math
import operator
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "CONTRASTS",
    "PAIRS",
    "PSFS",
    "STAINS",
    "PairedPhantomDataset",
    "PhantomDataset",
    "Tissue",
    "defocus",
    "head_phantom",
    "head_phantom_labels",
    "stain_phantom",
]


class Tissue(IntEnum):
    """Tissue classes of the phantoms (the values of :func:`head_phantom_labels`)."""

    BACKGROUND = 0
    SCALP = 1
    SKULL = 2
    CSF = 3
    GREY_MATTER = 4
    WHITE_MATTER = 5
    VENTRICLE = 6
    LESION = 7


def _table(values: Sequence[float]) -> dict[Tissue, float]:
    return {tissue: float(v) for tissue, v in zip(Tissue, values, strict=True)}


#: MR-like intensity of each tissue per contrast, in ``[0, 1]``. SCALP stands for skin and
#: subcutaneous fat; the marrow (diploe) inside the skull is rendered at 60% of the scalp value.
#: Lesions are MS-like: T1-hypointense, T2- and FLAIR-hyperintense. Entries added at run time
#: become valid ``contrast`` names.
CONTRASTS: dict[str, dict[Tissue, float]] = {
    #             BG   scalp  skull  CSF   GM    WM    vent  lesion
    "t1": _table([0.0, 0.80, 0.06, 0.10, 0.45, 0.70, 0.08, 0.30]),
    "t2": _table([0.0, 0.55, 0.04, 0.95, 0.52, 0.34, 1.00, 0.78]),
    "flair": _table([0.0, 0.60, 0.04, 0.07, 0.56, 0.40, 0.05, 0.95]),
    "pd": _table([0.0, 0.70, 0.06, 0.85, 0.74, 0.58, 0.90, 0.82]),
}

# Relative amplitude of the smooth multiplicative tissue texture.
_TEXTURE = _table([0.0, 0.10, 0.15, 0.02, 0.05, 0.035, 0.02, 0.06])
_DIPLOE_FRACTION = 0.6  # marrow intensity as a fraction of the scalp (fat) intensity

_F32 = np.float32
_FAR = 1.0e4  # distance given to points skipped because they are far from a structure
_LR, _SI = 2, 0  # head-frame axes: 0 inferior→superior, 1 anterior→posterior, 2 left-right


# ----------------------------------------------------------------------------------------------
# Random anatomy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in the head frame, turned by ``yaw`` radians about the superior axis."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw: float = 0.0


@dataclass(frozen=True)
class _Anatomy:
    """All random parameters of one subject except its lesions.

    A plane-wave field is ``sum_j sin(k_j . p + phase_j)``, with the wave vectors ``k`` a float32
    array of shape ``(3, J)``.
    """

    centre: np.ndarray  # (3,) head centre in image coordinates
    rotation: np.ndarray  # (3, 3) image frame -> head frame
    head_radii: tuple[float, float, float]
    egg: float  # the head is wider at the back by this fraction of its width
    scalp: float  # shell thicknesses, normalised units
    skull: float
    csf: float
    cortex: float
    sulc_k: np.ndarray  # sulcal pattern, head frame
    sulc_phase: np.ndarray
    sulc_grad: float  # RMS gradient norm of the (unit-variance) sulcal field
    sulc_depth: float
    sulc_width: float  # half-width of a sulcus
    fissure: float  # half-width of the interhemispheric fissure
    ventricles: tuple[_Ellipsoid, ...]  # right hemisphere, mirrored to the left
    deep_gm: tuple[_Ellipsoid, ...]  # right hemisphere, mirrored to the left
    tex_k: np.ndarray  # tissue texture, head frame
    tex_phase: np.ndarray
    bias_k: np.ndarray  # bias field, image frame
    bias_phase: np.ndarray
    slice_level: float  # axial level (image axis 0) of the 2D slice


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about the superior (yaw), left-right (pitch) and anterior (roll) head axes."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    r_yaw = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])
    r_pitch = np.array([[cp, -sp, 0], [sp, cp, 0], [0, 0, 1]])
    r_roll = np.array([[cr, 0, -sr], [0, 1, 0], [sr, 0, cr]])
    return r_yaw @ r_pitch @ r_roll


def _draw_anatomy(seed: int, index: int) -> _Anatomy:
    """Draws the anatomy of subject ``(seed, index)``; it depends on nothing else."""
    rng = np.random.default_rng([seed, index, 0])

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def waves(count: int, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        k = rng.standard_normal((3, count))
        k *= rng.uniform(lo, hi, count) / np.linalg.norm(k, axis=0)
        return k.astype(_F32), rng.uniform(0, 2 * math.pi, count).astype(_F32)

    atrophy = u(0.0, 1.0)  # widens CSF spaces, sulci and ventricles together
    deg = math.pi / 180.0
    rotation = _rotation(u(-8, 8) * deg, u(-5, 5) * deg, u(-4, 4) * deg)
    radii = (u(0.80, 0.90), u(0.80, 0.91), u(0.64, 0.75))
    sulc_k, sulc_phase = waves(32, 11.0, 17.0)
    sulc_k /= np.array(radii, dtype=_F32)[:, None]  # waves of the head-scaled frame

    vs = u(0.75, 1.05) + 0.35 * atrophy  # ventricle scale
    vz = u(0.10, 0.14)  # height of the lateral ventricles
    frontal_horn = _Ellipsoid(
        (vz, -0.13 * vs, 0.065 * vs), (0.10 * vs, 0.10 * vs, 0.05 * vs), yaw=u(-0.6, -0.4)
    )
    body = _Ellipsoid((vz, 0.02 * vs, 0.055 * vs), (0.10 * vs, 0.15 * vs, 0.035 * vs))
    atrium = _Ellipsoid(
        (vz - 0.02, 0.17 * vs, 0.10 * vs), (0.11 * vs, 0.10 * vs, 0.055 * vs), yaw=u(0.5, 0.7)
    )
    caudate = _Ellipsoid(
        (vz - 0.02, -0.13 * vs, 0.075 * vs + 0.085), (0.09, 0.085, 0.05), yaw=-0.35
    )
    thalamus = _Ellipsoid((vz - 0.13, 0.07, 0.085), (0.09, 0.12, 0.07), yaw=0.15)
    tex_k, tex_phase = waves(12, 8.0, 24.0)
    bias_k, bias_phase = waves(4, 1.0, 2.5)
    return _Anatomy(
        centre=rng.uniform(-0.03, 0.03, 3),
        rotation=rotation,
        head_radii=radii,
        egg=u(0.02, 0.06),
        scalp=u(0.045, 0.065),
        skull=u(0.035, 0.050),
        csf=0.010 + 0.020 * atrophy,
        cortex=u(0.032, 0.042),
        sulc_k=sulc_k,
        sulc_phase=sulc_phase,
        sulc_grad=float(np.sqrt((sulc_k.astype(np.float64) ** 2).sum(axis=0).mean())),
        sulc_depth=u(0.09, 0.13),
        sulc_width=0.006 + 0.008 * atrophy,
        fissure=0.006 + 0.008 * atrophy,
        ventricles=(frontal_horn, body, atrium),
        deep_gm=(caudate, thalamus),
        tex_k=tex_k,
        tex_phase=tex_phase,
        bias_k=bias_k,
        bias_phase=bias_phase,
        slice_level=u(0.05, 0.16),
    )


# Below the interhemispheric fissure: the corpus callosum and everything under it.
_CORE = _Ellipsoid((-0.06, 0.02, 0.0), (0.33, 0.40, 0.80))


# ----------------------------------------------------------------------------------------------
# Signed distances
# ----------------------------------------------------------------------------------------------

# A field is a pair (dn, ratio) of flat arrays: ``dn`` the approximate signed distance in
# normalised units (negative inside) and ``ratio`` the voxel size along the boundary normal, so
# the distance in voxels is ``dn / ratio``. Points are three flat coordinate arrays.
_Field = tuple[np.ndarray, np.ndarray]
_Vec = tuple[np.ndarray, np.ndarray, np.ndarray]


def _dot(a: _Vec, b: _Vec) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


class _Frame:
    """Points in the head frame and the metric that turns gradients into voxel units.

    Args:
        p: head-frame coordinates, three flat float32 arrays.
        metric: the 3x3 matrix ``R diag(spacing^2) R^T``, so that the squared gradient norm in
            voxel units is ``g^T metric g``; ``None`` for scattered points (ratio 1, no padding).
        pad: how far (normalised units) a soft edge reaches beyond its boundary.
    """

    def __init__(self, p: _Vec, metric: np.ndarray | list | None, pad: float):
        self.p = p
        self.metric = None if metric is None else [[float(v) for v in row] for row in metric]
        self.pad = pad

    @property
    def n(self) -> int:
        return self.p[0].size

    def subset(self, mask: np.ndarray) -> tuple[np.ndarray, _Frame]:
        """The points selected by ``mask`` (and their indices) as a new frame."""
        idx = np.flatnonzero(mask)
        return idx, _Frame(tuple(c[idx] for c in self.p), self.metric, self.pad)

    def field(self, phi: np.ndarray, g: _Vec) -> _Field:
        """Turns a level-set value and its head-frame gradient into a field."""
        gn2 = np.maximum(_dot(g, g), 1e-12)
        inv = 1.0 / np.sqrt(gn2)
        if self.metric is None:
            return phi * inv, np.ones_like(phi)
        m = self.metric
        gv2 = (
            m[0][0] * g[0] * g[0]
            + m[1][1] * g[1] * g[1]
            + m[2][2] * g[2] * g[2]
            + 2.0 * (m[0][1] * g[0] * g[1] + m[0][2] * g[0] * g[2] + m[1][2] * g[1] * g[2])
        )
        return phi * inv, np.sqrt(np.maximum(gv2, 1e-12) / gn2)

    def voxel(self, axis: int | None) -> np.ndarray:
        """Ratio of a boundary whose normal is the head-frame ``axis`` (RMS over all if None)."""
        if self.metric is None:
            v = 1.0
        elif axis is None:
            v = math.sqrt(sum(self.metric[i][i] for i in range(3)) / 3.0)
        else:
            v = math.sqrt(self.metric[axis][axis])
        return np.full(self.n, max(v, 1e-6), dtype=_F32)

    def ellipsoids(self, shapes: Sequence[_Ellipsoid], mirror: bool = False) -> _Field:
        """Field of a union of ellipsoids (evaluated together as ``(E, N)`` arrays); ``mirror``
        adds their reflections across the mid-sagittal plane."""
        p0, p1, p2 = self.p
        if mirror:
            lr_sign = np.where(p2 < 0, _F32(-1), _F32(1))
            p2 = np.abs(p2)

        c0, c1, c2 = np.array([e.centre for e in shapes], dtype=_F32).T[..., None]  # (E, 1)
        r0, r1, r2 = np.array([e.radii for e in shapes], dtype=_F32).T[..., None]
        yaw = np.array([e.yaw for e in shapes])[:, None]
        cy, sy = np.cos(yaw).astype(_F32), np.sin(yaw).astype(_F32)
        d1, d2 = p1 - c1, p2 - c2
        q0 = (p0 - c0) / r0
        q1 = (cy * d1 + sy * d2) / r1
        q2 = (cy * d2 - sy * d1) / r2
        rr = np.maximum(np.sqrt(q0 * q0 + q1 * q1 + q2 * q2), 1e-6)
        inv = 1.0 / rr
        gl1, gl2 = q1 * inv / r1, q2 * inv / r2
        g2 = sy * gl1 + cy * gl2
        if mirror:
            g2 *= lr_sign
        dn, ratio = self.field(rr - 1.0, (q0 * inv / r0, cy * gl1 - sy * gl2, g2))
        if len(shapes) == 1:
            return dn[0], ratio[0]
        pick = dn.argmin(axis=0)[None]
        return np.take_along_axis(dn, pick, 0)[0], np.take_along_axis(ratio, pick, 0)[0]

    def near(self, shapes: Sequence[_Ellipsoid], mirror: bool = False) -> np.ndarray:
        """Points inside a sphere that bounds all ``shapes`` (plus padding)."""
        centres = np.array([e.centre for e in shapes])
        m0, m1, m2 = (float(v) for v in centres.mean(axis=0))
        reach = max(math.dist(e.centre, (m0, m1, m2)) + max(e.radii) for e in shapes)
        p2 = np.abs(self.p[2]) if mirror else self.p[2]
        d2 = (self.p[0] - m0) ** 2 + (self.p[1] - m1) ** 2 + (p2 - m2) ** 2
        return d2 < (reach + self.pad) ** 2


def _offset(f: _Field, t: float) -> _Field:
    """Moves the boundary of ``f`` inwards by ``t`` normalised units (an erosion)."""
    return f[0] + t, f[1]


def _neg(f: _Field) -> _Field:
    return -f[0], f[1]


def _fmax(*fields: _Field) -> _Field:
    """Intersection of regions (selected by normalised distance, so labels never depend on it)."""
    dn, ratio = fields[0]
    for d2, r2 in fields[1:]:
        take = d2 > dn
        dn, ratio = np.where(take, d2, dn), np.where(take, r2, ratio)
    return dn, ratio


def _fmin(*fields: _Field) -> _Field:
    """Union of regions."""
    return _neg(_fmax(*[_neg(f) for f in fields]))


def _gather(f: _Field, idx: np.ndarray) -> _Field:
    return f[0][idx], f[1][idx]


def _scatter(n: int, idx: np.ndarray, f: _Field, base: _Field | None = None) -> _Field:
    """A field on all ``n`` points: ``f`` at ``idx``, ``base`` (or far outside) elsewhere."""
    if base is None:
        dn, ratio = np.full(n, _FAR, dtype=_F32), np.ones(n, dtype=_F32)
    else:
        dn, ratio = base[0].copy(), base[1].copy()
    dn[idx] = f[0]
    ratio[idx] = f[1]
    return dn, ratio


def _ellipsoids(frame: _Frame, shapes: Sequence[_Ellipsoid], mirror: bool) -> _Field:
    """Union of ellipsoids, evaluated only near them (far outside elsewhere)."""
    if not shapes:
        return np.full(frame.n, _FAR, dtype=_F32), np.ones(frame.n, dtype=_F32)
    idx, sub = frame.subset(frame.near(shapes, mirror))
    return _scatter(frame.n, idx, sub.ellipsoids(shapes, mirror))


def _wave_sum(p: Sequence[np.ndarray], k: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """A smooth random field of unit variance at points ``p``: ``sum_j sin(k_j . p + phase_j)``.

    Computed as a ``(J, N)`` array with NumPy elementwise operations: deterministic, and much
    faster here than a BLAS product with a short inner dimension.
    """
    arg = np.multiply.outer(k[0], p[0])
    arg += np.multiply.outer(k[1], p[1])
    arg += np.multiply.outer(k[2], p[2])
    arg += phase[:, None]
    np.sin(arg, out=arg)
    return arg.sum(axis=0) * _F32(math.sqrt(2.0 / k.shape[1]))


def _head(anat: _Anatomy, frame: _Frame) -> dict[str, _Field]:
    """Fields of the head outline, the outer surface of the skull and the intracranial space."""
    p = frame.p
    a = anat.head_radii
    # The outline is the unit sphere of the head-scaled frame s, widened towards the back:
    # s_lr is divided by d = 1 + egg * s_ap.
    s0, s1, s2 = (p[i] * (1.0 / a[i]) for i in range(3))
    d = 1.0 + anat.egg * s1
    s2 = s2 / d
    rs = np.maximum(np.sqrt(s0 * s0 + s1 * s1 + s2 * s2), 1e-6)
    inv = 1.0 / rs
    g = (s0 * inv * (1.0 / a[0]), (s1 - anat.egg * s2 * s2 / d) * inv * (1.0 / a[1]))
    g = (*g, s2 * inv / d * (1.0 / a[2]))
    head = frame.field(rs - 1.0, g)
    skull = _offset(head, anat.scalp)
    return {"head": head, "skull": skull, "icv": _offset(skull, anat.skull)}


def _structures(
    anat: _Anatomy, frame: _Frame, lesions: Sequence[_Ellipsoid] = (), deep: bool = True
) -> tuple[dict[str, _Field], np.ndarray]:
    """Fields of every structure: head chain on all points, the rest on the brain subset.

    Returns the fields and the indices of the brain subset; ``"pial"``, ``"wm"``,
    ``"ventricles"``, ``"deep_gm"`` and ``"lesions"`` live on that subset (every other point is outside them); ``deep=False`` skips the last three. Each inner structure is evaluated only where it can matter (near the cortex,
    near the fissure, near each group of ellipsoids); elsewhere its distance is far outside or that
    of its parent, which changes no label and no soft membership.
    """
    out = _head(anat, frame)
    b_idx, brain = frame.subset(out["icv"][0] < frame.pad)
    envelope = _offset(_gather(out["icv"], b_idx), anat.csf)

    # Sulci: slits of half-width sulc_width around the zero set of a band-limited random field n,
    # down to sulc_depth below the brain envelope; they run roughly radially and wander with
    # depth. The distance to the zero set is taken as |n| / (RMS of |grad n|), so the widths of a
    # sulcus and of the cortex lining it vary a little, and the voxel size across a sulcus as
    # that of a random direction. Only the cortical shell needs them.
    c_idx, cortex = brain.subset(envelope[0] > -(anat.sulc_depth + anat.cortex + frame.pad))
    n = _wave_sum(cortex.p, anat.sulc_k, anat.sulc_phase)
    slit = (np.abs(n) * (1.0 / anat.sulc_grad) - anat.sulc_width, cortex.voxel(None))
    env_c = _gather(envelope, c_idx)
    slits = _fmax(slit, _neg(_offset(env_c, anat.sulc_depth)))
    pial = _scatter(brain.n, c_idx, _fmax(env_c, _neg(slits)), base=envelope)

    # Interhemispheric fissure: a thin mid-sagittal CSF slab above the corpus callosum (the
    # core); only points within a cortical thickness of it need it.
    f_idx, mid = brain.subset(np.abs(brain.p[_LR]) < anat.fissure + anat.cortex + frame.pad)
    slab = (np.abs(mid.p[_LR]) - anat.fissure, mid.voxel(_LR))
    floor = (-0.2 - mid.p[_SI], mid.voxel(_SI))
    fissure = _fmax(slab, _neg(mid.ellipsoids([_CORE])), floor)
    pial = _scatter(brain.n, f_idx, _fmax(_gather(pial, f_idx), _neg(fissure)), base=pial)
    out["pial"] = pial
    # White matter: the pial region eroded by the cortical thickness, so grey matter lines both
    # banks of every sulcus and of the fissure.
    out["wm"] = _offset(pial, anat.cortex)
    if not deep:
        return out, b_idx
    out["ventricles"] = _ellipsoids(brain, anat.ventricles, mirror=True)
    out["deep_gm"] = _ellipsoids(brain, anat.deep_gm, mirror=True)
    out["lesions"] = _ellipsoids(brain, lesions, mirror=False)
    return out, b_idx


# ----------------------------------------------------------------------------------------------
# Grids and lesions
# ----------------------------------------------------------------------------------------------


def _as_size(spatial_dims: int, size: int | Sequence[int]) -> tuple[int, ...]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if isinstance(size, int | np.integer):
        size = (int(size),) * spatial_dims
    size = tuple(operator.index(s) for s in size)
    if len(size) != spatial_dims or any(s < 1 for s in size):
        raise ValueError(
            f"size must be a positive int or {spatial_dims} positive ints, got {size!r}"
        )
    return size


def _check_ids(seed: int, index: int) -> tuple[int, int]:
    seed, index = operator.index(seed), operator.index(index)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return seed, index


def _image_axes(size: tuple[int, ...], slice_level: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Voxel-centre coordinates along the three image axes and the voxel sizes.

    A 2D grid is the axial plane at ``slice_level`` of a 3D one (voxel size 0 across it).
    """
    axes = [((np.arange(n) + 0.5) * (2.0 / n) - 1.0).astype(_F32) for n in size]
    spacing = [2.0 / n for n in size]
    if len(size) == 2:
        axes = [np.array([slice_level], dtype=_F32), *axes]
        spacing = [0.0, *spacing]
    return axes, np.array(spacing)


def _frame(anat: _Anatomy, size: tuple[int, ...]) -> _Frame:
    """The grid of ``size`` in the head frame, ``p = R (x - c)``, assembled separably."""
    axes, spacing = _image_axes(size, anat.slice_level)
    p = []
    for j in range(3):
        acc = None
        for i, x in enumerate(axes):
            view = [1, 1, 1]
            view[i] = -1
            term = ((x - float(anat.centre[i])) * float(anat.rotation[j, i])).reshape(view)
            acc = term if acc is None else acc + term
        p.append(acc.reshape(-1))
    metric = anat.rotation @ np.diag(spacing**2) @ anat.rotation.T
    # Soft edges reach 0.75 voxel along the normal: at most 0.75 of the coarsest voxel.
    return _Frame(tuple(p), metric, pad=0.8 * float(spacing.max()))


def _lesion_count(lesions: int | tuple[int, int], rng: np.random.Generator) -> int:
    if isinstance(lesions, int | np.integer):
        if lesions < 0:
            raise ValueError(f"lesions must be non-negative, got {lesions}")
        return int(lesions)
    try:
        lo, hi = (operator.index(v) for v in lesions)
    except (TypeError, ValueError):
        raise ValueError(f"lesions must be an int or a (low, high) pair, got {lesions!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"lesions range must satisfy 0 <= low <= high, got {lesions!r}")
    return int(rng.integers(lo, hi + 1))


def _draw_lesions(
    anat: _Anatomy,
    seed: int,
    index: int,
    spatial_dims: int,
    spacing: np.ndarray,
    lesions: int | tuple[int, int],
) -> list[_Ellipsoid]:
    """Places separated lesions in the deep white matter (in the slice plane for 2D).

    Candidates are tried in a fixed random order, so the placement depends only on
    ``(seed, index, spatial_dims)`` and, on grids coarser than 64 voxels along an axis, on the
    voxel size (lesions must span a few voxels to be seen).
    """
    rng = np.random.default_rng([seed, index, 1, spatial_dims])
    count = _lesion_count(lesions, rng)
    if count == 0:
        return []
    coarsest = float(spacing.max())
    h = max(coarsest, 2.0 / 64)  # placement is the same on all grids at least this fine
    nominal = rng.uniform(0.025, 0.06, (count, 3))
    yaws = rng.uniform(-1.5, 1.5, count)
    cand = rng.uniform(-0.6, 0.6, (384 if spatial_dims == 2 else 1024, 3))
    if spatial_dims == 2:
        cand[:, 0] = anat.slice_level
    p = (cand - anat.centre) @ anat.rotation.T
    frame = _Frame(tuple(p[:, i].astype(_F32) for i in range(3)), None, 0.1 + 2.5 * h)
    st, b_idx = _structures(anat, frame, deep=False)
    d_wm = np.full(len(cand), _FAR, dtype=_F32)
    d_wm[b_idx] = st["wm"][0]
    # Probes around a candidate, in the head frame: its centre and a ring (2D) or sphere (3D).
    if spatial_dims == 2:
        t = np.linspace(0, 2 * math.pi, 16, endpoint=False)
        ring = np.stack([np.zeros_like(t), np.cos(t), np.sin(t)], axis=1) @ anat.rotation.T
    else:  # a Fibonacci sphere
        z = np.linspace(1, -1, 48)
        t = np.arange(48) * math.pi * (3.0 - math.sqrt(5.0))
        rho = np.sqrt(1 - z * z)
        ring = np.stack([z, rho * np.cos(t), rho * np.sin(t)], axis=1)
    probe = np.concatenate([np.zeros((1, 3)), ring])

    def in_white_matter(points: np.ndarray) -> np.ndarray:
        sub = _Frame(tuple(points[:, i].astype(_F32) for i in range(3)), None, 0.0)
        fields, idx = _structures(anat, sub)
        inside = np.zeros(len(points), dtype=bool)
        inside[idx] = (
            (fields["wm"][0] < 0) & (fields["ventricles"][0] > 0) & (fields["deep_gm"][0] > 0)
        )
        return inside

    # Lesions stay in the white matter, clear of cortex, ventricles and deep grey matter, so that
    # nothing splits them (the centre and a ring of probes around it must all be white matter;
    # those structures are too large to hide inside the ring), and more than a voxel apart, so
    # that each is one connected component. Where they do not fit they shrink, down to the
    # smallest size a grid shows (1.2 voxels in radius); failing that, the margins go and lesions
    # may merge. Levels: (scale of the radii, clearance in voxels, keep apart and probe).
    levels = ((1.0, 0.5, True), (0.75, 0.5, True), (0.5, 0.0, True), (0.5, 0.0, False))
    for scale, clear, strict in levels:
        radii = np.maximum(nominal * scale, 1.2 * coarsest)
        rmax = np.maximum(nominal * scale, 1.2 * h).max(axis=1) * strict
        clear *= h
        gap = 1.1 * h if strict else -1.0
        reach = rmax.max() + clear
        pool = np.flatnonzero(d_wm < -clear)
        verified: dict[int, bool] = {}
        centres: list[np.ndarray] = []
        for pos, k in enumerate(pool):
            r = rmax[len(centres)]
            dist = [np.linalg.norm(p[k] - c) - rmax[j] for j, c in enumerate(centres)]
            if dist and min(dist) < r + gap:
                continue
            if strict and k not in verified:  # probe the next few candidates in one batch
                batch = pool[pos : pos + 16]
                rim = (p[batch, None, :] + reach * probe[None]).reshape(-1, 3)
                ok = in_white_matter(rim).reshape(len(batch), -1).all(axis=1)
                verified.update(zip(batch.tolist(), ok.tolist(), strict=True))
            if strict and not verified[k]:
                continue
            centres.append(p[k])
            if len(centres) == count:
                return [
                    _Ellipsoid(tuple(map(float, c)), tuple(map(float, rad)), yaw=float(y))
                    for c, rad, y in zip(centres, radii, yaws, strict=True)
                ]
    raise ValueError(f"cannot fit {count} lesions in the white matter of this phantom; ask fewer")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _soft(f: _Field, smooth: bool) -> np.ndarray:
    """Inside-indicator of a field: partial volume (a smoothstep over 1.5 voxels) or hard."""
    if not smooth:
        return (f[0] < 0).astype(_F32)
    t = np.clip(0.5 - f[0] / (1.5 * f[1]), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _Phantom:
    """One evaluated phantom: flat labels, soft memberships (outer on all points, inner on the
    brain subset ``b_idx``) and everything needed to shade it."""

    size: tuple[int, ...]
    anat: _Anatomy
    frame: _Frame
    fields: dict[str, _Field]
    b_idx: np.ndarray
    labels: np.ndarray
    outer: dict[Tissue, np.ndarray]
    inner: dict[Tissue, np.ndarray]


def _evaluate(
    spatial_dims: int,
    size: int | Sequence[int],
    index: int,
    seed: int,
    lesions: int | tuple[int, int],
    smooth: bool | None,
) -> _Phantom:
    """Evaluates the geometry of one phantom; ``smooth=None`` skips the soft memberships."""
    size = _as_size(spatial_dims, size)
    seed, index = _check_ids(seed, index)
    anat = _draw_anatomy(seed, index)
    frame = _frame(anat, size)
    _, spacing = _image_axes(size, anat.slice_level)
    blobs = _draw_lesions(anat, seed, index, spatial_dims, spacing, lesions)
    st, b_idx = _structures(anat, frame, blobs)

    labels = (st["head"][0] < 0).astype(np.int64)
    labels += st["skull"][0] < 0
    labels += st["icv"][0] < 0  # the chain is nested: this counts the shells a point is inside
    wm = st["wm"][0] < 0
    inner = (st["pial"][0] < 0).astype(np.int64) + wm
    vent = wm & (st["ventricles"][0] < 0)
    dgm = wm & ~vent & (st["deep_gm"][0] < 0)
    inner[dgm] = Tissue.GREY_MATTER - Tissue.CSF
    inner[vent] = Tissue.VENTRICLE - Tissue.CSF
    inner[wm & ~vent & ~dgm & (st["lesions"][0] < 0)] = Tissue.LESION - Tissue.CSF
    labels[b_idx] += inner
    ph = _Phantom(size, anat, frame, st, b_idx, labels, {}, {})
    if smooth is None:
        return ph

    h_head = _soft(st["head"], smooth)
    h_skull = np.minimum(_soft(st["skull"], smooth), h_head)
    h_icv = np.minimum(_soft(st["icv"], smooth), h_skull)
    ph.outer = {Tissue.SCALP: h_head - h_skull, Tissue.SKULL: h_skull - h_icv, Tissue.CSF: h_icv}
    h_pial = np.minimum(_soft(st["pial"], smooth), h_icv[b_idx])
    h_wm = np.minimum(_soft(st["wm"], smooth), h_pial)
    m_vent = np.minimum(_soft(st["ventricles"], smooth), h_wm)
    m_dgm = np.minimum(_soft(st["deep_gm"], smooth), h_wm - m_vent)
    rest = h_wm - m_vent - m_dgm
    m_les = np.minimum(_soft(st["lesions"], smooth), rest)
    ph.inner = {  # CSF here is a correction to the outer CSF (h_icv) on the brain subset
        Tissue.CSF: -h_pial,
        Tissue.GREY_MATTER: h_pial - h_wm + m_dgm,
        Tissue.WHITE_MATTER: rest - m_les,
        Tissue.VENTRICLE: m_vent,
        Tissue.LESION: m_les,
    }
    return ph


def _contrast_table(contrast: str) -> dict[Tissue, float]:
    try:
        return CONTRASTS[contrast]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown contrast {contrast!r}; valid contrasts are: {', '.join(sorted(CONTRASTS))}"
        ) from None


def head_phantom_labels(
    spatial_dims: int,
    size: int | Sequence[int],
    index: int = 0,
    seed: int = 0,
    lesions: int | tuple[int, int] = (0, 3),
) -> torch.Tensor:
    """Returns the tissue label map of one procedural head phantom.

    Subject ``(seed, index)`` is drawn from its own random streams, so the result is bit-identical
    on every call and independent of any global RNG state. A 2D map is an axial slice through the
    head at the level of the lateral ventricles.

    Args:
        spatial_dims: 2 for an axial slice, 3 for a volume.
        size: grid size, one int for every axis or one per axis. The field of view is always
            ``[-1, 1]`` along each axis, so anisotropic sizes give anisotropic voxels.
        index: subject index (non-negative).
        seed: dataset seed (non-negative); ``(seed, index)`` identifies the subject.
        lesions: number of white-matter lesions: an int for an exact count, or ``(low, high)``
            for a count drawn uniformly from that inclusive range. Lesions are placed apart and
            inside the white matter, so each is one connected component wherever they fit (in
            our checks: always, for up to 5 lesions on grids of 32 voxels per axis or more);
            on coarser grids they shrink to 1.2 voxels in radius and may finally merge.

    Returns:
        Tensor of shape ``(*size)``, dtype int64, holding :class:`Tissue` values.

    Raises:
        ValueError: on a bad ``spatial_dims``, ``size``, ``seed``, ``index`` or ``lesions``.
    """
    ph = _evaluate(spatial_dims, size, index, seed, lesions, smooth=None)
    return torch.from_numpy(ph.labels.reshape(ph.size))


def head_phantom(
    spatial_dims: int,
    size: int | Sequence[int],
    index: int = 0,
    seed: int = 0,
    contrast: str = "t1",
    lesions: int | tuple[int, int] = (0, 3),
    noise_std: float = 0.0,
    bias_field: float = 0.0,
    smooth: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Renders one procedural MR-like head phantom.

    All contrasts of one ``(seed, index)`` share exactly the label map of
    :func:`head_phantom_labels` (they are paired images of one subject), and also its texture and
    bias field; the noise is drawn per contrast. Intensities come from :data:`CONTRASTS`, with a
    darker galea in the scalp fat, bright marrow between the tables of the skull and a faint
    smooth texture.

    Args:
        spatial_dims: 2 for an axial slice, 3 for a volume.
        size: grid size, one int for every axis or one per axis.
        index: subject index (non-negative).
        seed: dataset seed (non-negative); ``(seed, index)`` identifies the subject.
        contrast: a key of :data:`CONTRASTS`: ``"t1"``, ``"t2"``, ``"flair"`` or ``"pd"``.
        lesions: number of white-matter lesions: an int, or an inclusive ``(low, high)`` range.
        noise_std: standard deviation of Rician-like noise (the magnitude of the image plus
            complex Gaussian noise); 0 disables it.
        bias_field: amplitude of a smooth multiplicative bias field (0.2 gives about ±20%);
            0 disables it.
        smooth: partial-volume (anti-aliased) edges; ``False`` gives piecewise-constant tissues.
        dtype: floating dtype of the result.

    Returns:
        Tensor of shape ``(1, *size)`` with values in ``[0, 1]``.

    Raises:
        ValueError: on an unknown contrast or another bad argument.
    """
    _contrast_table(contrast)  # validates before the geometry is evaluated
    if not noise_std >= 0 or not bias_field >= 0:
        raise ValueError(
            f"noise_std and bias_field must be non-negative, got {noise_std}, {bias_field}"
        )
    ph = _evaluate(spatial_dims, size, index, seed, lesions, smooth=bool(smooth))
    image = _shade(ph, contrast, seed, index, spatial_dims, noise_std, bias_field)
    return torch.from_numpy(image).to(dtype)


def _shade(
    ph: _Phantom,
    contrast: str,
    seed: int,
    index: int,
    spatial_dims: int,
    noise_std: float,
    bias_field: float,
) -> np.ndarray:
    """Renders an evaluated phantom in one MR contrast: float32 ``(1, *size)`` in ``[0, 1]``."""
    table = _contrast_table(contrast)
    anat, frame, st, b_idx = ph.anat, ph.frame, ph.fields, ph.b_idx

    image = ph.outer[Tissue.CSF] * table[Tissue.CSF]
    sub = sum(m * table[t] for t, m in ph.inner.items())
    image[b_idx] += sub

    # Scalp and skull: a darker galea within the fat and fatty marrow (diploe) between the two
    # tables of the skull, as Gaussian bands across the depth below the skin, blurred by the
    # voxel size along the normal so that they never alias.
    idx, _ = frame.subset((st["head"][0] < frame.pad) & (st["icv"][0] > -frame.pad))
    depth, voxel = _gather(st["head"], idx)
    depth = -depth

    def band(centre: float, width: float) -> np.ndarray:
        w2 = width * width + (0.4 * voxel) ** 2
        return np.exp((depth - centre) ** 2 / (-2.0 * w2)) * (width / np.sqrt(w2))

    scalp, bone = table[Tissue.SCALP], table[Tissue.SKULL]
    marrow = _DIPLOE_FRACTION * scalp
    scalp_value = scalp * (1.0 - 0.4 * band(0.7 * anat.scalp, 0.15 * anat.scalp))
    skull_value = bone + (marrow - bone) * band(anat.scalp + 0.5 * anat.skull, 0.2 * anat.skull)
    image[idx] += ph.outer[Tissue.SCALP][idx] * scalp_value
    image[idx] += ph.outer[Tissue.SKULL][idx] * skull_value

    # A faint smooth texture, fixed to the anatomy: the same in every contrast.
    idx, inside = frame.subset(st["head"][0] < frame.pad)
    texture = _wave_sum(inside.p, anat.tex_k, anat.tex_phase)
    gain = np.zeros(frame.n, dtype=_F32)
    for t, m in ph.outer.items():
        gain += m * (table[t] * _TEXTURE[t])
    gain[b_idx] += sum(m * (table[t] * _TEXTURE[t]) for t, m in ph.inner.items())
    image[idx] += gain[idx] * texture

    if bias_field > 0:
        axes, _ = _image_axes(ph.size, anat.slice_level)
        grid = [g.reshape(-1) for g in np.meshgrid(*axes, indexing="ij")]
        field = _wave_sum(grid, anat.bias_k, anat.bias_phase)
        image *= np.maximum(1.0 + float(bias_field) * field, 0.0)
    if noise_std > 0:
        rng = np.random.default_rng([seed, index, 2, spatial_dims, zlib.crc32(contrast.encode())])
        noise = rng.standard_normal((2, frame.n), dtype=_F32) * _F32(noise_std)
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(image, 0.0, 1.0).reshape(1, *ph.size)


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
        _contrast_table(contrast)
        self.size = _as_size(spatial_dims, size)
        self.length, self.offset = operator.index(length), operator.index(offset)
        self.seed = _check_ids(seed, self.offset)[0]
        if self.length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        _lesion_count(lesions, np.random.default_rng(0))  # validates early
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


# ----------------------------------------------------------------------------------------------
# Paired variants: defocus and stains
# ----------------------------------------------------------------------------------------------

#: Kinds of point-spread function understood by :func:`defocus`.
PSFS: tuple[str, ...] = ("disk", "gaussian")


def _disk_kernel(spatial_dims: int, radius: float) -> np.ndarray:
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


def _convolve(x: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
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
        x = _convolve(x, _disk_kernel(spatial_dims, strength))
    else:  # separable: one 1D pass per axis
        g = _gauss_kernel(strength)
        for axis in range(spatial_dims):
            shape = [1] * spatial_dims
            shape[axis] = g.size
            x = _convolve(x, g.reshape(shape))
    return x.reshape(image.shape).to(image.dtype if image.is_floating_point() else dtype)


#: Stain names understood by :func:`stain_phantom`.
STAINS: tuple[str, ...] = ("he", "ihc")

# Optical density (per unit concentration) of haematoxylin, eosin and DAB in the R, G and B
# channels: the stain vectors of Ruifrok & Johnston (2001), unit length (also skimage's hed).
_STAIN_OD = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAIN_OD /= np.linalg.norm(_STAIN_OD, axis=1, keepdims=True)

# Per-tissue concentrations (BG, scalp, skull, CSF, GM, WM, ventricle, lesion). Nuclei are placed
# with a per-pixel probability (cellularity); lesions are hypercellular, CSF spaces empty.
_EOSIN = _table([0.0, 0.32, 0.60, 0.02, 0.20, 0.30, 0.01, 0.24])
_HAEM_MATRIX = _table([0.0, 0.08, 0.05, 0.0, 0.16, 0.07, 0.0, 0.20])  # faint, outside nuclei
_CELLULARITY = _table([0.0, 0.015, 0.006, 0.0, 0.04, 0.012, 0.0, 0.09])
# IHC: DAB in "positive" tissue (grey matter, e.g. a neuronal marker, and lesions, e.g. a marker of
# proliferating cells), nearly none elsewhere; the counterstain is a lighter haematoxylin.
_DAB = _table([0.0, 0.0, 0.0, 0.0, 0.55, 0.03, 0.0, 0.95])
_NUCLEUS_RADIUS = 1.5  # pixels
_NUCLEUS_H = {"he": 1.1, "ihc": 0.8}  # haematoxylin in a nucleus
_MATRIX_H = {"he": 0.6, "ihc": 0.9}  # scale of the matrix haematoxylin
_POSITIVE = (Tissue.GREY_MATTER, Tissue.LESION)


def _mix(ph: _Phantom, values: dict[Tissue, float]) -> np.ndarray:
    """Per-voxel value of a tissue property, weighted by the soft memberships (flat float32)."""
    out = sum(m * _F32(values[t]) for t, m in ph.outer.items())
    out[ph.b_idx] += sum(m * _F32(values[t]) for t, m in ph.inner.items())
    return out


def _stain_textures(
    ph: _Phantom, seed: int, index: int, spatial_dims: int
) -> tuple[np.ndarray, np.ndarray]:
    """The stain-independent parts of a section: nuclei (a soft mask) and a fibre texture.

    Drawn from ``(seed, index)`` only, so the H&E and IHC renderings of one subject show the very
    same cells (a restained section, pixel-aligned).
    """
    rng = np.random.default_rng([seed, index, 3, spatial_dims])
    size = ph.size
    seeds = rng.random(ph.frame.n, dtype=np.float32) < _mix(ph, _CELLULARITY)
    seeds = torch.from_numpy(seeds.reshape(1, *size).astype(np.float32))
    disk = _disk_kernel(spatial_dims, _NUCLEUS_RADIUS)
    # the disk sums to 1: scale so that a lone nucleus is 1 at its centre, then saturate overlaps
    nuclei = _convolve(seeds, disk / disk.max()).clamp_(0.0, 1.0).numpy().reshape(-1)
    fibres = rng.standard_normal(ph.frame.n, dtype=np.float32).reshape(1, *size)
    fibres = defocus(torch.from_numpy(fibres), 0.8, kind="gaussian").numpy().reshape(-1)
    fibres *= _F32(1.0 / max(float(fibres.std()), 1e-6))
    return nuclei, fibres


def _stain_rgb(
    ph: _Phantom,
    stain: str,
    seed: int,
    index: int,
    spatial_dims: int,
    noise_std: float,
    parts: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Renders an evaluated phantom as a stained section: float32 ``(3, *size)`` in ``[0, 1]``."""
    nuclei, fibres = parts if parts is not None else _stain_textures(ph, seed, index, spatial_dims)
    anat, frame = ph.anat, ph.frame
    idx, inside = frame.subset(ph.fields["head"][0] < frame.pad)
    texture = np.zeros(frame.n, dtype=_F32)
    texture[idx] = _wave_sum(inside.p, anat.tex_k, anat.tex_phase)
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
    ph = _evaluate(spatial_dims, size, index, seed, lesions, smooth=True)
    seed, index = _check_ids(seed, index)
    rgb = _stain_rgb(ph, stain, seed, index, spatial_dims, float(noise_std))
    return torch.from_numpy(rgb).to(dtype)


#: Kinds of pair produced by :class:`PairedPhantomDataset`.
PAIRS: tuple[str, ...] = ("contrast", "defocus", "stain")


def _rician(image: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``image`` plus complex Gaussian noise (as :func:`head_phantom`), clipped."""
    noise = rng.standard_normal((2, *image.shape), dtype=_F32) * _F32(noise_std)
    return np.clip(np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2), 0.0, 1.0)


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
            _contrast_table(source)
        if pair == "contrast":
            _contrast_table(target)
        strength = float(strength)
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"strength must be a non-negative number of pixels, got {strength}")
        self.size = _as_size(spatial_dims, size)
        self.length, self.offset = operator.index(length), operator.index(offset)
        self.seed = _check_ids(seed, self.offset)[0]
        if self.length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        _lesion_count(lesions, np.random.default_rng(0))  # validates early
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
        ph = _evaluate(dims, self.size, index, seed, self.lesions, smooth=True)
        if self.pair == "contrast":
            a = _shade(ph, self.source, seed, index, dims, self.noise_std, 0.0)
            b = _shade(ph, self.target, seed, index, dims, self.noise_std, 0.0)
        elif self.pair == "defocus":
            sharp = _shade(ph, self.source, seed, index, dims, 0.0, 0.0)
            blurred = defocus(torch.from_numpy(sharp), self.strength).numpy()
            a, b = blurred, sharp
            if self.noise_std > 0:
                a = _rician(a, self.noise_std, np.random.default_rng([seed, index, 6, dims, 0]))
                b = _rician(b, self.noise_std, np.random.default_rng([seed, index, 6, dims, 1]))
        else:
            parts = _stain_textures(ph, seed, index, dims)
            a = _stain_rgb(ph, "he", seed, index, dims, self.noise_std, parts)
            b = _stain_rgb(ph, "ihc", seed, index, dims, self.noise_std, parts)
        return a, b
