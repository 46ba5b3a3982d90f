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
from medgen.data.latents import LatentDataset, read_latent_index
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
    "LatentDataset",
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
    "read_latent_index",
    "resolve_sources",
    "split_by_subject",
    "write",
]
