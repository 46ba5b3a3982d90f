"""The random anatomy of the head phantoms, their tissue labels and their MR-like rendering.

A subject ``(seed, index)`` is drawn as analytic geometry (:func:`head_phantom_labels` gives its
tissue labels, :class:`Tissue`), evaluated on a grid with partial-volume edges (:func:`evaluate`)
and shaded in an MR contrast of :data:`CONTRASTS` (:func:`head_phantom`); see the package
docstring for the model.
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


def tissue_table(values: Sequence[float]) -> dict[Tissue, float]:
    """``{tissue: value}`` from one value per :class:`Tissue`, in the order of the enum."""
    return {tissue: float(v) for tissue, v in zip(Tissue, values, strict=True)}


#: MR-like intensity of each tissue per contrast, in ``[0, 1]``. SCALP stands for skin and
#: subcutaneous fat; the marrow (diploe) inside the skull is rendered at 60% of the scalp value.
#: Lesions are MS-like: T1-hypointense, T2- and FLAIR-hyperintense. Entries added at run time
#: become valid ``contrast`` names.
CONTRASTS: dict[str, dict[Tissue, float]] = {
    #             BG   scalp  skull  CSF   GM    WM    vent  lesion
    "t1": tissue_table([0.0, 0.80, 0.06, 0.10, 0.45, 0.70, 0.08, 0.30]),
    "t2": tissue_table([0.0, 0.55, 0.04, 0.95, 0.52, 0.34, 1.00, 0.78]),
    "flair": tissue_table([0.0, 0.60, 0.04, 0.07, 0.56, 0.40, 0.05, 0.95]),
    "pd": tissue_table([0.0, 0.70, 0.06, 0.85, 0.74, 0.58, 0.90, 0.82]),
}

# Relative amplitude of the smooth multiplicative tissue texture.
_TEXTURE = tissue_table([0.0, 0.10, 0.15, 0.02, 0.05, 0.035, 0.02, 0.06])
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


def wave_sum(p: Sequence[np.ndarray], k: np.ndarray, phase: np.ndarray) -> np.ndarray:
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
    n = wave_sum(cortex.p, anat.sulc_k, anat.sulc_phase)
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


def as_size(spatial_dims: int, size: int | Sequence[int]) -> tuple[int, ...]:
    """``size`` (one int, or one per axis) as ``spatial_dims`` positive ints."""
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


def check_ids(seed: int, index: int) -> tuple[int, int]:
    """``(seed, index)`` as non-negative ints, else a ValueError."""
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


def lesion_count(lesions: int | tuple[int, int], rng: np.random.Generator) -> int:
    """The lesion count: ``lesions`` itself, or drawn from the inclusive range ``(low, high)``."""
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
    count = lesion_count(lesions, rng)
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
class Phantom:
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


def evaluate(
    spatial_dims: int,
    size: int | Sequence[int],
    index: int,
    seed: int,
    lesions: int | tuple[int, int],
    smooth: bool | None,
) -> Phantom:
    """Evaluates the geometry of one phantom; ``smooth=None`` skips the soft memberships."""
    size = as_size(spatial_dims, size)
    seed, index = check_ids(seed, index)
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
    ph = Phantom(size, anat, frame, st, b_idx, labels, {}, {})
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


def contrast_table(contrast: str) -> dict[Tissue, float]:
    """The intensity of each tissue in ``contrast`` (a key of :data:`CONTRASTS`)."""
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
    ph = evaluate(spatial_dims, size, index, seed, lesions, smooth=None)
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
    contrast_table(contrast)  # validates before the geometry is evaluated
    if not noise_std >= 0 or not bias_field >= 0:
        raise ValueError(
            f"noise_std and bias_field must be non-negative, got {noise_std}, {bias_field}"
        )
    ph = evaluate(spatial_dims, size, index, seed, lesions, smooth=bool(smooth))
    image = shade(ph, contrast, seed, index, spatial_dims, noise_std, bias_field)
    return torch.from_numpy(image).to(dtype)


def shade(
    ph: Phantom,
    contrast: str,
    seed: int,
    index: int,
    spatial_dims: int,
    noise_std: float,
    bias_field: float,
) -> np.ndarray:
    """Renders an evaluated phantom in one MR contrast: float32 ``(1, *size)`` in ``[0, 1]``."""
    table = contrast_table(contrast)
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
    texture = wave_sum(inside.p, anat.tex_k, anat.tex_phase)
    gain = np.zeros(frame.n, dtype=_F32)
    for t, m in ph.outer.items():
        gain += m * (table[t] * _TEXTURE[t])
    gain[b_idx] += sum(m * (table[t] * _TEXTURE[t]) for t, m in ph.inner.items())
    image[idx] += gain[idx] * texture

    if bias_field > 0:
        axes, _ = _image_axes(ph.size, anat.slice_level)
        grid = [g.reshape(-1) for g in np.meshgrid(*axes, indexing="ij")]
        field = wave_sum(grid, anat.bias_k, anat.bias_phase)
        image *= np.maximum(1.0 + float(bias_field) * field, 0.0)
    if noise_std > 0:
        rng = np.random.default_rng([seed, index, 2, spatial_dims, zlib.crc32(contrast.encode())])
        noise = rng.standard_normal((2, frame.n), dtype=_F32) * _F32(noise_std)
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return np.clip(image, 0.0, 1.0).reshape(1, *ph.size)
