"""Datasets over medical image files: volumes, 2D slices, 3D patches, paired and unpaired images.

Every dataset reads files with :func:`medgen.data.io.read` (MONAI ``LoadImage`` underneath) and
returns a dict of channel-first ``float32`` tensors plus ``"path"`` and ``"subject"`` entries.
Images stay :class:`~monai.data.MetaTensor` objects whose ``.affine`` follows every crop, slice and
flip, and whose ``meta`` keeps ``"spacing"``, ``"source_dtype"`` and ``"filename_or_obj"``.
Intensities are never rescaled here (a 16-bit PNG comes back as the same integers in ``float32``,
CT as HU): scaling belongs to the ``transform`` every dataset accepts, applied to each image tensor
after reading, so intensity presets plug in later.

Where the files come from is described once by :func:`resolve_sources` (a folder, a glob pattern, a
CSV file, a MONAI-style JSON datalist or a list) and split with :func:`split_by_subject`, which never
puts one subject on both sides (slices and patches inherit the subject of their volume).

Bad input fails early with a :class:`~medgen.data.io.MedgenIOError` that names the file: missing or
empty folders, missing listed files, images of the wrong dimensionality or channel count (checked
from the file headers at construction when ``check_shapes=True``), images of different sizes that
would not batch (within a split, and across the splits of a data module with
:func:`check_shapes_across_splits`), NaN/Inf values, unmatched or mismatched pairs. No dataset ever writes to its input
files; on-disk caches go to a separate ``cache_dir``.

Randomness (patch origins, paired crops and flips, the unpaired partner) is a pure function of
``(seed, epoch, index)`` drawn from :func:`numpy.random.default_rng`; the global RNGs are neither
read nor changed, so a resumed run sees the same samples as one that never stopped.

Example::

    from medgen.data.datasets import SliceDataset, resolve_sources, split_by_subject

    items = resolve_sources("data/t1/*.nii.gz")
    train_items, val_items = split_by_subject(items, val_fraction=0.1, seed=0)
    train = SliceDataset(items=train_items, axis=0, cache="memory")
    val = SliceDataset(items=val_items, axis=0)

The package has one module per concern: ``sources`` (:func:`resolve_sources`, datalists,
:func:`split_by_subject`), ``checks`` (header shapes, channel rules), ``volumes``
(:class:`VolumeDataset` and its caches), ``slices``, ``patches``, ``splits``
(:func:`check_shapes_across_splits`), ``paired`` (:class:`PairedDataset`, :func:`bci_pairs`),
``unpaired``, and the helpers ``affine`` (affines of crops, flips and slices) and ``epochs``
(per-epoch randomness). What the former single module exported is importable from
``medgen.data.datasets``.
"""

# PathLike, Source, CacheMode, ImageTransform and the medgen.data.io names were importable from
# medgen.data.datasets when it was one module: they stay so (hence the noqa: F401).
from medgen.data.datasets.paired import PairedDataset, bci_pairs
from medgen.data.datasets.patches import PatchDataset
from medgen.data.datasets.slices import SliceDataset
from medgen.data.datasets.sources import (  # noqa: F401
    PathLike,
    Source,
    resolve_sources,
    split_by_subject,
)
from medgen.data.datasets.splits import check_shapes_across_splits
from medgen.data.datasets.unpaired import UnpairedDataset
from medgen.data.datasets.volumes import (  # noqa: F401
    CacheMode,
    ImageTransform,
    VolumeDataset,
)
from medgen.data.io import (  # noqa: F401
    IMAGE_SUFFIXES,
    MedgenIOError,
    dicom_series_shape,
    files_by_stem,
    image_stem,
    image_suffix,
    list_images,
    read,
)

__all__ = [
    "PairedDataset",
    "PatchDataset",
    "SliceDataset",
    "UnpairedDataset",
    "VolumeDataset",
    "bci_pairs",
    "check_shapes_across_splits",
    "resolve_sources",
    "split_by_subject",
]
