"""Differentiable augmentation of the images a discriminator sees (ADA), 2D and 3D."""

from medgen.augment.ada import AdaptiveAugment, sampling_to_normalized, warp_affine

__all__ = ["AdaptiveAugment", "sampling_to_normalized", "warp_affine"]
