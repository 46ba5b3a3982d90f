"""Medical data in and out: readers/writers, datasets, presets, phantoms, the DataModule."""

from medgen.data.datamodule import MedicalDataModule
from medgen.data.datasets import (
    PairedDataset,
    PatchDataset,
    SliceDataset,
    UnpairedDataset,
    VolumeDataset,
    bci_pairs,
    resolve_sources,
    split_by_subject,
)
from medgen.data.io import MedgenIOError, list_images, read, write
from medgen.data.phantoms import (
    CONTRASTS,
    PairedPhantomDataset,
    PhantomDataset,
    Tissue,
    head_phantom,
    head_phantom_labels,
)

__all__ = [
    "CONTRASTS",
    "MedgenIOError",
    "MedicalDataModule",
    "PairedDataset",
    "PairedPhantomDataset",
    "PatchDataset",
    "PhantomDataset",
    "SliceDataset",
    "Tissue",
    "UnpairedDataset",
    "VolumeDataset",
    "bci_pairs",
    "head_phantom",
    "head_phantom_labels",
    "list_images",
    "read",
    "resolve_sources",
    "split_by_subject",
    "write",
]
