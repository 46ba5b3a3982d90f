"""Building blocks shared by every net; each takes ``spatial_dims`` (2 or 3) first."""

from medgen.nn.attention import SelfAttention
from medgen.nn.blocks import ConvBlock, ResBlock, zero_module
from medgen.nn.cross_attention import CrossAttention, SpatialTransformer
from medgen.nn.distributions import DiagonalGaussian
from medgen.nn.embeddings import timestep_embedding
from medgen.nn.factories import (
    avg_pool_nd,
    conv_nd,
    conv_transpose_nd,
    get_act_layer,
    get_norm_layer,
)
from medgen.nn.fir import Blur, FIRDownsample, FIRUpsample, make_fir_kernel, upfirdn
from medgen.nn.quantizer import QuantizerOutput, VectorQuantizer
from medgen.nn.sampling import Downsample, Upsample
from medgen.nn.stylegan import EqualConv, EqualLinear, ModulatedConv, NoiseInjection

__all__ = [
    "Blur",
    "ConvBlock",
    "CrossAttention",
    "DiagonalGaussian",
    "Downsample",
    "EqualConv",
    "EqualLinear",
    "FIRDownsample",
    "FIRUpsample",
    "ModulatedConv",
    "NoiseInjection",
    "QuantizerOutput",
    "ResBlock",
    "SelfAttention",
    "SpatialTransformer",
    "Upsample",
    "VectorQuantizer",
    "avg_pool_nd",
    "conv_nd",
    "conv_transpose_nd",
    "get_act_layer",
    "get_norm_layer",
    "make_fir_kernel",
    "timestep_embedding",
    "upfirdn",
    "zero_module",
]
