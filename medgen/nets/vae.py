"""Variational autoencoder network (2D/3D) built from medgen's Encoder and Decoder.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from medgen.nets.autoencoder import Decoder, Encoder
from medgen.nn.distributions import DiagonalGaussian
from medgen.utils.sequences import per_axis


class VAENet(nn.Module):
    """Encoder/decoder pair with a diagonal Gaussian posterior.

    Two latent layouts:

    - spatial (``latent_dim=None``): the latent is a ``(latent_channels, *spatial / f)`` map, with
      ``f = 2 ** (len(channels) - 1)``, as in the KL autoencoders of latent diffusion;
    - vector (``latent_dim=N``): the encoder's feature map is flattened into an ``N``-dimensional
      latent vector through a linear layer (and back), the classic VAE whose prior samples are
      whole images. Needs ``image_size``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Output channels (default ``in_channels``).
        channels: Feature channels per resolution level.
        num_res_blocks: Residual blocks per level.
        attention_levels: Per level, whether to add self-attention.
        latent_channels: Channels of the latent map (spatial) or of the flattened map (vector).
        latent_dim: Size of the latent vector, or ``None`` for a spatial latent.
        image_size: Spatial size of the images (int or per axis); required for ``latent_dim``.
        norm_num_groups: GroupNorm groups.
        num_head_channels: Channels per attention head.
        gradient_checkpointing: Recompute block activations in the backward pass.
        init_logvar: Initial posterior log-variance (bias of the log-variance output). A
            negative value starts training with little latent noise, so the decoder learns to use
            the latent before the KL term (usually warmed up) shapes the posterior; 0 is the
            textbook initialisation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64, 128),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] | None = None,
        latent_channels: int = 4,
        latent_dim: int | None = None,
        image_size: int | Sequence[int] | None = None,
        norm_num_groups: int = 32,
        num_head_channels: int | None = None,
        gradient_checkpointing: bool = False,
        init_logvar: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.latent_dim = latent_dim
        self.latent_channels = latent_channels
        out_channels = in_channels if out_channels is None else out_channels
        common = dict(
            spatial_dims=spatial_dims,
            channels=tuple(channels),
            num_res_blocks=num_res_blocks,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            gradient_checkpointing=gradient_checkpointing,
        )
        factor = 2 ** (len(channels) - 1)
        self.downsample_factor = factor
        if latent_dim is None:
            self.encoder = Encoder(
                in_channels=in_channels, out_channels=2 * latent_channels, **common
            )
            self.feature_shape = None
        else:
            if image_size is None:
                raise ValueError("a vector latent (latent_dim) needs image_size")
            size = per_axis(image_size, spatial_dims, "image_size")
            if len(size) != spatial_dims or any(s % factor for s in size):
                raise ValueError(
                    f"image_size {tuple(size)} must have {spatial_dims} entries divisible by {factor}"
                )
            self.feature_shape = (latent_channels, *(s // factor for s in size))
            features = math.prod(self.feature_shape)
            self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels, **common)
            self.to_moments = nn.Linear(features, 2 * latent_dim)
            self.from_latent = nn.Linear(latent_dim, features)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels, **common)
        with torch.no_grad():
            if latent_dim is None:
                self.encoder.conv_out.bias[latent_channels:].fill_(init_logvar)
            else:
                self.to_moments.bias[latent_dim:].fill_(init_logvar)

    def latent_shape(self, image_shape: Sequence[int] | None = None) -> tuple[int, ...]:
        """Shape of one latent (without batch) for images of spatial shape ``image_shape``."""
        if self.latent_dim is not None:
            return (self.latent_dim,)
        if image_shape is None:
            raise ValueError("a spatial latent needs the image shape")
        return (self.latent_channels, *(s // self.downsample_factor for s in image_shape))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior q(z|x) for images ``(B, C, *spatial)``."""
        h = self.encoder(x)
        if self.latent_dim is None:
            return DiagonalGaussian.from_moments(h)
        return DiagonalGaussian.from_moments(self.to_moments(h.flatten(1)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C_out, *spatial)`` from latents ``(B, *latent_shape)``."""
        if self.latent_dim is not None:
            z = self.from_latent(z).reshape(z.shape[0], *self.feature_shape)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` through a reparameterised posterior sample; returns (recon, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator=generator)), posterior
