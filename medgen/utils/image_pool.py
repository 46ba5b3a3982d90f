"""History buffer of generated images for discriminator updates.

Shrivastava, Pfister, Tuzel, Susskind, Wang, Webb. "Learning from Simulated and Unsupervised Images
through Adversarial Training." CVPR 2017, Sec. 2.3: updating the discriminator with a history of
refined images, not only the latest ones, stabilises adversarial training. Zhu, Park, Isola, Efros.
"Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks." ICCV 2017,
Sec. 4: a buffer of the 50 previously generated images.

The rule (CycleGAN's reference code, described in REFERENCES.md; our own implementation): for every
image of a batch, while the pool holds fewer than ``pool_size`` images the image is stored and
returned; once full, with probability 0.5 a uniformly chosen stored image is returned and the new
one takes its place, otherwise the new image is returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ImagePool"]


class ImagePool:
    """Buffer of previously generated images (Shrivastava et al. 2017; CycleGAN, Zhu et al. 2017).

    Stored images are detached clones, so the pool never holds a graph. The returned batch is
    detached as well (it feeds the discriminator's loss on fakes, which never back-propagates
    into the generator). Random draws use ``generator`` (a CPU :class:`torch.Generator`), or
    torch's global generator when it is ``None`` (so ``lightning.seed_everything`` makes runs
    reproducible either way).

    Save and restore the pool with the checkpoint, e.g. in a LightningModule::

        def on_save_checkpoint(self, checkpoint):
            checkpoint["image_pool"] = self.pool.state_dict()

        def on_load_checkpoint(self, checkpoint):
            self.pool.load_state_dict(checkpoint["image_pool"])

    Args:
        pool_size: number of images kept; 0 disables the pool (``query`` returns its input).
        generator: CPU generator for the random draws (seed it for reproducible runs).

    Example:
        >>> pool = ImagePool(pool_size=4, generator=torch.Generator().manual_seed(0))
        >>> pool.query(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 1, 8, 8])
        >>> len(pool)
        2
    """

    def __init__(self, pool_size: int = 50, generator: torch.Generator | None = None) -> None:
        if isinstance(pool_size, bool) or int(pool_size) != pool_size or pool_size < 0:
            raise ValueError(f"pool_size must be a non-negative integer, got {pool_size!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator.device}")
        self.pool_size = int(pool_size)
        self.generator = generator
        self.images: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator pickles its state through shared memory, which fails when a model is
        # sent to DDP's spawned processes (``trainer=ddp_cpu``): keep the state as plain bytes.
        state = dict(self.__dict__)
        if self.generator is not None:
            state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = state.get("generator")
        if isinstance(generator, bytes):
            rebuilt = torch.Generator()
            rebuilt.set_state(torch.frombuffer(bytearray(generator), dtype=torch.uint8))
            state = {**state, "generator": rebuilt}
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"ImagePool(pool_size={self.pool_size}, stored={len(self.images)})"

    def _swap(self) -> bool:
        return bool(torch.rand((), generator=self.generator) < 0.5)

    def _index(self) -> int:
        return int(torch.randint(0, len(self.images), (), generator=self.generator))

    @torch.no_grad()
    def query(self, images: Tensor) -> Tensor:
        """Return a batch mixing the given images with images from the history.

        Args:
            images: ``(B, ...)`` freshly generated images (usually ``(B, C, *spatial)``).

        Returns:
            ``(B, ...)`` detached batch: position ``i`` holds either ``images[i]`` or an image
            stored earlier (which ``images[i]`` then replaces in the pool). With ``pool_size=0``
            the input itself is returned unchanged.
        """
        if self.pool_size == 0:
            return images
        if images.ndim < 1:
            raise ValueError("images must have a batch dimension, got a 0-d tensor")
        out = []
        for image in images.detach():
            if len(self.images) < self.pool_size:
                self.images.append(image.clone())
                out.append(image)
            elif self._swap():
                index = self._index()
                old = self.images[index]
                self.images[index] = image.clone()
                out.append(old.to(device=image.device, dtype=image.dtype))
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        """The stored images (in order), the pool size and the generator's state if one was given."""
        state: dict[str, Any] = {"pool_size": self.pool_size, "images": list(self.images)}
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the pool's length included).

        Raises:
            ValueError: if the saved pool holds more images than this pool's ``pool_size``.
        """
        images = list(state_dict.get("images", []))
        if len(images) > self.pool_size:
            raise ValueError(
                f"the saved image pool holds {len(images)} images but this pool's pool_size is "
                f"{self.pool_size}"
            )
        if not all(isinstance(image, Tensor) for image in images):
            raise TypeError("state_dict['images'] must be a list of tensors")
        self.images = [image.detach().clone() for image in images]
        if self.generator is not None and "generator_state" in state_dict:
            self.generator.set_state(state_dict["generator_state"])
