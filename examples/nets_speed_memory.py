"""Build medgen's nets from a MONAI configuration and use their speed and memory options.

Shows, on a small 3D diffusion UNet:
* a MONAI ``DiffusionModelUNet`` configuration dict used unchanged;
* activation memory (bytes saved for backward) with and without gradient checkpointing;
* channels-last-3d, which speeds up 3D convolutions on CPU and GPU;
* the EMA vector quantiser and a StyleGAN2 modulated convolution from ``medgen.nn``.

Run:  python examples/nets_speed_memory.py
"""

from __future__ import annotations

import torch

from medgen.nets import DiffusionUNet
from medgen.nn import ModulatedConv, NoiseInjection, VectorQuantizer
from medgen.utils.memory import saved_tensor_bytes

MONAI_CONFIG = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": (16, 32, 32),
    "attention_levels": (False, False, True),
    "num_res_blocks": 1,
    "num_head_channels": 32,
    "norm_num_groups": 16,
}


def saved_mib(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """MiB of distinct storages autograd keeps for the backward pass of one step."""
    return saved_tensor_bytes(lambda: net(x, t).square().mean()) / 2**20


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    t = torch.tensor([500])

    unet = DiffusionUNet(**MONAI_CONFIG)  # the same dict builds MONAI's DiffusionModelUNet
    print(f"parameters: {sum(p.numel() for p in unet.parameters()):,}")
    print(f"saved for backward: {saved_mib(unet, x, t):.1f} MiB")
    # Checkpointing keeps block inputs only; block-internal activations are recomputed. (The
    # hooks cannot see what checkpointing keeps; benchmarks/bench_nets.py measures that too.)
    unet.gradient_checkpointing = True
    print(f"saved with checkpointing (outside blocks): {saved_mib(unet, x, t):.1f} MiB")
    unet.gradient_checkpointing = False

    # Channels-last-3d: same outputs, faster 3D convolutions.
    cl = torch.channels_last_3d
    with torch.no_grad():
        ref = unet(x, t)
        out = unet.to(memory_format=cl)(x.contiguous(memory_format=cl), t)
    print(f"channels-last-3d max difference: {(out - ref).abs().max():.2e}")

    # A VQ bottleneck for 3D latents and a StyleGAN2 layer.
    vq = VectorQuantizer(3, num_embeddings=64, embedding_dim=4).train()
    q = vq(torch.randn(2, 4, 8, 8, 8))
    print(f"VQ: indices {tuple(q.indices.shape)}, perplexity {q.perplexity:.1f}")
    conv = ModulatedConv(3, 8, 8, 3, style_dim=16, up=True)
    noise = NoiseInjection(3)
    y = noise(conv(torch.randn(2, 8, 4, 4, 4), torch.randn(2, 16)))
    print(f"modulated up-conv: {tuple(y.shape)}")


if __name__ == "__main__":
    main()
