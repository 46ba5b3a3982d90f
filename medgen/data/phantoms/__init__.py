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

Modules: ``anatomy`` (the random anatomy, :class:`Tissue` labels and the MR contrasts of
:func:`head_phantom`), ``degradations`` (:func:`defocus`, :func:`stain_phantom` and noise: the paired
variants) and ``datasets`` (:class:`PhantomDataset`, :class:`PairedPhantomDataset`).
"""

# Relative imports, so that the package also loads from its folder without the rest of medgen
# (tests/test_phantoms.py checks determinism in a fresh interpreter that way).
from .anatomy import CONTRASTS, Tissue, head_phantom, head_phantom_labels
from .datasets import PAIRS, PairedPhantomDataset, PhantomDataset
from .degradations import PSFS, STAINS, defocus, stain_phantom

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
