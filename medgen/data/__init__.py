"""Medical data in and out: readers/writers, datasets, phantoms, the DataModule."""

from medgen.data.datamodule import MedicalDataModule
from medgen.data.io import MedgenIOError, read, write
from medgen.data.phantoms import (
    CONTRASTS,
    PhantomDataset,
    Tissue,
    head_phantom,
    head_phantom_labels,
)

__all__ = [
    "CONTRASTS",
    "MedgenIOError",
    "MedicalDataModule",
    "PhantomDataset",
    "Tissue",
    "head_phantom",
    "head_phantom_labels",
    "read",
    "write",
]
