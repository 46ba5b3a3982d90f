"""AGGrGAN: aggregation of several GANs' outputs, sharpness-weighted merging and style transfer.

AGGrGAN (Mukherkjee, Saha, Kaplun, Sinitca, Sarkar, "Brain tumor image generation using an
aggregation of GAN models with style transfer", Scientific Reports 12, 2022,
doi 10.1038/s41598-022-12646-y) trains three base GANs (two DCGAN variants and a WGAN), keeps
the best candidates, merges them pixel-wise by local sharpness and refines the merge by neural
style transfer with VGG-19. The
paper has no public code; the concrete choices below follow a published re-implementation (see
``REFERENCES.md``) and every number is a keyword argument:

- :func:`ssim_select`: keep the ``k`` best of ``K`` candidates per sample by SSIM to a real
  image, or by mutual SSIM when there is none.
- :func:`sharpness_weights` / :func:`sharpness_merge`: per-pixel weights from the Sobel gradient
  magnitude smoothed by a Gaussian (``sigma = 2``), normalised over candidates.
- :func:`style_transfer`: Gatys et al. (CVPR 2016) optimisation of the image with Adam so that
  its VGG content features match the merge and its Gram matrices match a style image.
- :func:`aggregate`: selection followed by merging.

All functions take 2D ``(…, C, H, W)`` and 3D ``(…, C, D, H, W)`` tensors (style transfer works
on 3D volumes slice by slice, see :func:`style_transfer`).
"""

from medgen.models.aggrgan.module import AGGrGAN, default_members
from medgen.models.aggrgan.ops import (
    aggregate,
    sharpness_merge,
    sharpness_weights,
    ssim_select,
    style_transfer,
)

__all__ = [
    "AGGrGAN",
    "aggregate",
    "default_members",
    "sharpness_merge",
    "sharpness_weights",
    "ssim_select",
    "style_transfer",
]
