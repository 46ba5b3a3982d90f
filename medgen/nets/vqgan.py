"""Vector-quantised autoencoder network (2D/3D): encoder, EMA codebook, decoder.

The first stage of VQ-GAN (Esser et al., "Taming Transformers for High-Resolution Image
Synthesis", CVPR 2021) and of Medical Diffusion (Khader et al., "Denoising diffusion probabilistic
models for 3D medical image generation", Sci. Rep. 2023): the encoder's output vectors are
replaced by their nearest codebook entries (van den Oord et al., "Neural Discrete Representation
Learning", NeurIPS 2017), and the decoder maps the quantised map back to an image.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from medgen.nets.autoencoder import Decoder, Encoder
from medgen.nn.quantizer import QuantizerOutput, VectorQuantizer

__all__ = ["VQGANNet"]


class VQGANNet(nn.Module):
    """Encoder → :class:`~medgen.nn.VectorQuantizer` (EMA, dead-code restarts) → decoder.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        out_channels: Output channels (default ``in_channels``).
        channels: Feature channels per resolution level (``f = 2 ** (len(channels) - 1)``);
            Medical Diffusion: ``[16, 32, 64]`` (16 hidden channels, downsampling 4 per axis).
        num_res_blocks: Residual blocks per level.
        attention_levels: Per level, whether to add self-attention (Medical Diffusion: none).
        embedding_dim: Code dimension ``D`` = latent channels (Medical Diffusion: 8).
        num_embeddings: Codebook size ``K`` (Medical Diffusion: 16384).
        commitment_cost: Commitment weight ``beta`` (0.25).
        decay: EMA decay of the codebook.
        dead_code_threshold: EMA usage below which a code is restarted from the batch.
        norm_num_groups: GroupNorm groups.
        num_head_channels: Channels per attention head.
        gradient_checkpointing: Recompute block activations in the backward pass.
        downsample_mode: ``"conv"`` (stride-2 convolutions, as Medical Diffusion) or
            ``"avgpool"``.

    Shapes:
        ``(B, C, *spatial) -> (B, C_out, *spatial)``; latents ``(B, D, *spatial / f)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (16, 32, 64),
        num_res_blocks: int = 1,
        attention_levels: Sequence[bool] | None = None,
        embedding_dim: int = 8,
        num_embeddings: int = 16384,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        norm_num_groups: int = 32,
        num_head_channels: int | None = None,
        gradient_checkpointing: bool = False,
        downsample_mode: str = "conv",
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.latent_channels = int(embedding_dim)
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
        self.downsample_factor = 2 ** (len(channels) - 1)
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=embedding_dim,
            downsample_mode=downsample_mode,
            **common,
        )
        self.quantizer = VectorQuantizer(
            spatial_dims,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            commitment_cost=commitment_cost,
            decay=decay,
            dead_code_threshold=dead_code_threshold,
        )
        self.decoder = Decoder(in_channels=embedding_dim, out_channels=out_channels, **common)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape ``(D, *spatial / f)`` of one latent for images of spatial shape ``image_shape``."""
        return (self.latent_channels, *(int(s) // self.downsample_factor for s in image_shape))

    def encode(self, x: Tensor) -> Tensor:
        """Continuous (pre-quantisation) latents ``(B, D, *spatial / f)`` of ``(B, C, *spatial)``."""
        return self.encoder(x)

    def quantize(self, z: Tensor) -> QuantizerOutput:
        """Nearest codes of ``z`` (updating the codebook in training mode)."""
        return self.quantizer(z)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, C_out, *spatial * f)`` from (quantised) latents ``(B, D, *spatial)``."""
        return self.decoder(z)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Images from code indices ``(B, *spatial)``."""
        return self.decoder(self.quantizer.lookup(indices).to(self.decoder.conv_in.weight.dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct ``x``; returns ``(reconstruction, quantizer output)``."""
        out = self.quantize(self.encode(x))
        return self.decode(out.quantized), out

    def extra_repr(self) -> str:
        return f"downsample_factor={self.downsample_factor}"
