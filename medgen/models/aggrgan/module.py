"""The AGGrGAN LightningModule: an ensemble of GANs whose samples are aggregated.

:class:`AGGrGAN` trains its member GANs together (:func:`default_members` by default) or wraps
separately trained ones (:meth:`AGGrGAN.from_generators`); it samples through the image operations
of :mod:`medgen.models.aggrgan.ops` and writes augmentation folders (:meth:`AGGrGAN.write_dataset`).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medgen.losses.adversarial import AdversarialObjective, resolve_adv_loss
from medgen.losses.perceptual import VGGFeatures
from medgen.models.adversarial import DEFAULT_GAN_OPTIMIZER, build_net, zero_step_counter
from medgen.models.aggrgan.ops import aggregate, style_transfer
from medgen.models.base import SAMPLE, WRITE_DATASET
from medgen.models.gan import DEFAULT_DISCRIMINATOR, DEFAULT_GENERATOR, GAN, LatentGANModule


def default_members() -> list[dict[str, Any]]:
    """AGGrGAN's three base GANs: two DCGAN variants and a WGAN-GP (configs, 64 px)."""
    dcgan_opt = {"_target_": "torch.optim.Adam", "lr": 2e-4, "betas": [0.5, 0.999]}
    wgan_opt = {"_target_": "torch.optim.Adam", "lr": 1e-4, "betas": [0.0, 0.9]}
    generator = {"_target_": "medgen.nets.DCGANGenerator", "latent_dim": 100}
    return [
        {
            "name": "dcgan",
            "generator": {**generator, "upsample": "transpose"},
            "discriminator": {"_target_": "medgen.nets.DCGANDiscriminator"},
            "optimizer_g": dcgan_opt,
            "optimizer_d": dcgan_opt,
        },
        {
            "name": "dcgan_resize",
            "generator": {**generator, "upsample": "nearest_conv"},
            "discriminator": {"_target_": "medgen.nets.DCGANDiscriminator"},
            "optimizer_g": dcgan_opt,
            "optimizer_d": dcgan_opt,
        },
        {
            "name": "wgan_gp",
            "generator": {**generator, "upsample": "transpose"},
            "discriminator": {"_target_": "medgen.nets.WGANCritic", "norm": "layer"},
            "adv_loss": "wgan",
            "gp_weight": 10.0,
            "n_critic": 5,
            "optimizer_g": wgan_opt,
            "optimizer_d": wgan_opt,
        },
    ]


_MEMBER_KEYS = {
    "name",
    "generator",
    "discriminator",
    "adv_loss",
    "loss",
    "gp_weight",
    "r1_gamma",
    "r1_interval",
    "n_critic",
    "optimizer_g",
    "optimizer_d",
}
_STYLE_KEYS = {
    "weights_path",
    "sha256",
    "arch",
    "content_layers",
    "style_layers",
    "content_weight",
    "style_weight",
    "steps",
    "lr",
}


class AGGrGAN(LatentGANModule):
    """AGGrGAN (Mukherkjee et al., Sci. Rep. 2022): an ensemble of GANs whose outputs are
    selected by SSIM, merged by local sharpness and refined by style transfer.

    The ``K`` member GANs (default: :func:`default_members`, a DCGAN with transposed
    convolutions, a DCGAN with resize-convolutions and a WGAN-GP) train together: every batch is
    one discriminator step of every member, and each member's generator steps after every
    ``n_critic`` of its discriminator steps, with its own losses and optimisers
    (:class:`~medgen.models.gan.AdversarialObjective`). :attr:`generator_steps` and
    :attr:`discriminator_steps` hold one counter per member.

    :meth:`sample` draws one candidate per member for every sample, keeps the best ``k`` by SSIM
    (to reference images when given, by mutual SSIM otherwise; :func:`ssim_select`), merges them
    by sharpness weights (:func:`sharpness_merge`) and, when ``style`` has a VGG-19 weights file,
    refines the merge towards style images (the references by default) with Gatys et al.'s
    style transfer (:func:`style_transfer`). :meth:`write_dataset` writes the result as an
    augmentation folder with a ``selection.csv``. :meth:`from_generators` builds the pipeline
    over separately trained :class:`~medgen.models.GAN` models.

    Args:
        members: Member configs, each a dict with ``name``, ``generator`` and ``discriminator``
            net configs and optionally ``adv_loss`` (``loss`` is its deprecated name), ``gp_weight``, ``r1_gamma``, ``r1_interval``,
            ``n_critic``, ``optimizer_g``, ``optimizer_d`` (as :class:`~medgen.models.GAN`).
        net_defaults: Kwargs added to every member's generator and discriminator unless the
            member sets them: e.g. ``image_size``, and ``image_channels`` (the generators'
            ``out_channels`` and the discriminators' ``in_channels``).
        spatial_dims: 2 or 3.
        k: Candidates kept per sample (AGGrGAN: the best two of three).
        sharpness_sigma: Gaussian smoothing of the Sobel magnitude (AGGrGAN: 2).
        ssim_kernel_size: SSIM window for the selection (odd, at most the image side).
        style: Style transfer settings: ``weights_path`` (local VGG-19/16 torchvision weights;
            without it style transfer is off), ``sha256``, ``arch``, ``content_layers``,
            ``style_layers``, ``content_weight``, ``style_weight``, ``steps``, ``lr`` (see
            :func:`style_transfer`).
        scheduler: Optional scheduler config for every optimiser (stepped per epoch).
        image_key: Key of the images in a batch dict.
        value_range: Data range ``(low, high)`` of the images.
        spacing: Voxel spacing of exported 3D samples.
        num_log_images: Samples per validation grid.
        val_features_width: Width of the random-conv features of ``val/mmd``.
    """

    export_modules = ("generators",)
    capabilities = frozenset({SAMPLE, WRITE_DATASET})

    def __init__(
        self,
        members: Sequence[Mapping[str, Any]] | None = None,
        net_defaults: Mapping[str, Any] | None = None,
        spatial_dims: int = 2,
        k: int = 2,
        sharpness_sigma: float = 2.0,
        ssim_kernel_size: int = 11,
        style: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        image_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        spacing: Sequence[float] | None = None,
        num_log_images: int = 16,
        val_features_width: int = 16,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            value_range=value_range,
            optimizer_g=DEFAULT_GAN_OPTIMIZER,
            scheduler=scheduler,
            spacing=spacing,
            image_key=image_key,
            val_features_width=val_features_width,
        )
        self.save_hyperparameters()
        members = [dict(m) for m in (members or default_members())]
        if not members:
            raise ValueError("AGGrGAN needs at least one member GAN")
        if not 1 <= k <= len(members):
            raise ValueError(f"k must be between 1 and the number of members {len(members)}")
        names = [str(m.get("name", f"member{i}")) for i, m in enumerate(members)]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        defaults = dict(net_defaults or {})
        generators, discriminators, objectives = [], [], []
        for name, member in zip(names, members, strict=True):
            unknown = set(member) - _MEMBER_KEYS
            if unknown:
                raise ValueError(f"member {name!r}: unknown keys {sorted(unknown)}")
            g_conf = {**_net_defaults(defaults, "generator"), **member["generator"]}
            d_conf = {**_net_defaults(defaults, "discriminator"), **member["discriminator"]}
            generators.append(build_net(g_conf, spatial_dims, f"{name}.generator"))
            discriminators.append(build_net(d_conf, spatial_dims, f"{name}.discriminator"))
            objective = AdversarialObjective(
                resolve_adv_loss(member.get("adv_loss"), member.get("loss"), f"{name}.loss"),
                float(member.get("gp_weight", 0.0)),
                float(member.get("r1_gamma", 0.0)),
                int(member.get("r1_interval", 1)),
                int(member.get("n_critic", 1)),
            )
            objective.check_discriminator(discriminators[-1])
            objectives.append(objective)
        sizes = {tuple(getattr(g, "image_size", ())) for g in generators}
        if len(sizes) != 1:
            raise ValueError(f"all member generators must make the same image size, got {sizes}")
        self.member_names = names
        self.members_config = members
        self.generators = nn.ModuleList(generators)
        self.discriminators = nn.ModuleList(discriminators)
        self.objectives = objectives
        self.k = int(k)
        self.sharpness_sigma = float(sharpness_sigma)
        self.ssim_kernel_size = int(ssim_kernel_size)
        self.style_config = dict(style or {})
        unknown = set(self.style_config) - _STYLE_KEYS
        if unknown:
            raise ValueError(f"style: unknown keys {sorted(unknown)}; valid: {sorted(_STYLE_KEYS)}")
        self._style_extractor: VGGFeatures | None = None
        self._warned_no_style = False
        self.num_log_images = num_log_images
        count = len(generators)
        self.register_buffer("generator_steps", zero_step_counter(count))
        self.register_buffer("discriminator_steps", zero_step_counter(count))

    @property
    def style_enabled(self) -> bool:
        """Whether style transfer runs (a VGG weights file is configured)."""
        return bool(self.style_config.get("weights_path"))

    # ----------------------------------------------------------------- training
    def optimizer_groups(self):
        """A G/D optimiser pair per member (generator, discriminator, generator, ...)."""
        groups = []
        for member, g, d in zip(
            self.members_config, self.generators, self.discriminators, strict=True
        ):
            opt_g = member.get("optimizer_g", DEFAULT_GAN_OPTIMIZER)
            groups += [(g.parameters(), opt_g), (d.parameters(), member.get("optimizer_d", opt_g))]
        return groups

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        real = batch[self.image_key]
        self.check_images(real, self.generators[0])
        real = self.to_net(real)
        optimizers = self.optimizer_list()
        for i, name in enumerate(self.member_names):
            terms = self.update_pair(
                self.generators[i],
                self.discriminators[i],
                self.objectives[i],
                optimizers[2 * i],
                optimizers[2 * i + 1],
                real,
                int(self.discriminator_steps[i]),
            )
            self.discriminator_steps[i] += 1
            if "g_loss" in terms:
                self.count_generator_step(i)
            self.log_dict({f"train/{name}/{k}": v for k, v in terms.items()})
        self.step_schedulers("step")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.check_images(batch[self.image_key], self.generators[0])
        super().validation_step(batch, batch_idx)

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def candidates(self, num_samples: int, seed: int | None = None, batch_size: int = 64) -> Tensor:
        """One image per member for each sample: ``(K, N, C, *spatial)`` in data units.

        Member ``i`` draws its latents with seed ``seed + i`` (independent candidates).
        """
        return torch.stack(
            [
                self.run_generator(g, num_samples, None if seed is None else seed + i, batch_size)
                for i, g in enumerate(self.generators)
            ]
        )

    def _extractor(self) -> VGGFeatures:
        if self._style_extractor is None:
            conf = self.style_config
            layers = tuple(conf.get("content_layers", ("relu4_2",))) + tuple(
                conf.get("style_layers", _GATYS_STYLE_LAYERS)
            )
            self._style_extractor = VGGFeatures(
                arch=conf.get("arch", "vgg19"),
                weights_path=conf["weights_path"],
                sha256=conf.get("sha256"),
                layers=tuple(dict.fromkeys(layers)),
                value_range=self.value_range,
            ).to(self.device)
        return self._style_extractor

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        seed: int | None = None,
        batch_size: int = 64,
        reference: Tensor | None = None,
        style_images: Tensor | None = None,
        return_selection: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """AGGrGAN samples ``(N, C, *spatial)`` in data units.

        Args:
            num_samples: Number of images.
            seed: Seed of the members' latents (``None``: random).
            batch_size: Generator batch size.
            reference: Real images ``(R, C, *spatial)`` in data units; sample ``n`` is scored
                against ``reference[n % R]``. ``None``: mutual SSIM between the candidates.
            style_images: Style targets ``(R', C, *spatial)`` for style transfer (sample ``n``
                uses ``style_images[n % R']``); default: ``reference``. Style transfer runs only
                when ``style.weights_path`` is set and style images are available.
            return_selection: Also return ``{"indices": (k, N), "scores": (K, N)}``.
        """
        candidates = self.candidates(num_samples, seed, batch_size)
        reference = _cycle(reference, num_samples)
        merged, selection = aggregate(
            candidates,
            reference,
            k=self.k,
            sigma=self.sharpness_sigma,
            data_range=self.data_range,
            kernel_size=self.ssim_kernel_size,
        )
        style_images = _cycle(style_images, num_samples) if style_images is not None else reference
        if self.style_enabled and style_images is not None:
            conf = self.style_config
            extractor = self._extractor()
            merged = torch.cat(
                [
                    style_transfer(
                        content.to(self.device),
                        style.to(self.device),
                        extractor,
                        content_layers=tuple(conf.get("content_layers", ("relu4_2",))),
                        style_layers=tuple(conf.get("style_layers", _GATYS_STYLE_LAYERS)),
                        content_weight=float(conf.get("content_weight", 5.0)),
                        style_weight=float(conf.get("style_weight", 10.0)),
                        steps=int(conf.get("steps", 500)),
                        lr=float(conf.get("lr", 0.01)),
                    ).cpu()
                    for content, style in zip(
                        merged.split(batch_size), style_images.split(batch_size), strict=True
                    )
                ]
            )
        elif self.style_enabled and not self._warned_no_style:
            self._warned_no_style = True
            warnings.warn(
                "AGGrGAN: style transfer is configured but no style images were given "
                "(pass reference= or style_images=); returning the merged images (warned once)",
                stacklevel=2,
            )
        if return_selection:
            return merged, selection
        return merged

    def log_images(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        real = batch[self.image_key][: self.num_log_images]
        n = self.num_log_images
        images = {"real": real, "aggregated": self.sample(n, seed=0)}
        for name, member in zip(self.member_names, self.candidates(n, seed=0), strict=True):
            images[f"member_{name}"] = member
        return images

    def write_dataset(
        self,
        folder: str | os.PathLike,
        num_samples: int,
        seed: int = 0,
        reference: Tensor | None = None,
        style_images: Tensor | None = None,
        batch_size: int = 64,
    ) -> list[Path]:
        """Write ``num_samples`` AGGrGAN images to ``folder`` as an augmentation dataset.

        Images are written as by ``medgen-sample`` (16-bit PNG for grey 2D, NIfTI with the
        model's spacing for 3D), plus ``selection.csv``: per file, the members kept (best first)
        and every member's SSIM score.

        Returns:
            The image paths.
        """
        from medgen.data.outputs import write_images
        from medgen.utils.files import atomic_path, ensure_writable_dir

        folder = ensure_writable_dir(folder, "dataset folder")
        images, selection = self.sample(
            num_samples, seed, batch_size, reference, style_images, return_selection=True
        )
        paths = write_images(self, images, folder, prefix="aggrgan")
        indices, scores = selection["indices"].cpu(), selection["scores"].cpu()
        header = ["file", "kept"] + [f"ssim_{name}" for name in self.member_names]
        with atomic_path(folder / "selection.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for n, path in enumerate(paths):
                kept = "+".join(self.member_names[int(i)] for i in indices[:, n])
                writer.writerow(
                    [path.name, kept] + [f"{float(s):.6f}" for s in scores[:, n].tolist()]
                )
        return paths

    @classmethod
    def from_generators(
        cls,
        models: Sequence[str | os.PathLike | GAN],
        names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> AGGrGAN:
        """An AGGrGAN over separately trained GANs (checkpoints, exported folders or modules).

        Each model's generator config and weights (EMA weights for checkpoints with an EMA
        callback) become a member; the discriminators are not needed for sampling. All models
        must share ``spatial_dims`` and ``value_range``.

        Args:
            models: :class:`~medgen.models.GAN` instances or paths for :func:`medgen.load`.
            names: Member names (default: ``member0``, ``member1``, ...).
            **kwargs: Other :class:`AGGrGAN` arguments (``k``, ``style``, ...).
        """
        from medgen.pretrained import load

        loaded = [m if isinstance(m, GAN) else load(m) for m in models]
        for source, model in zip(models, loaded, strict=True):
            if not isinstance(model, GAN):
                raise TypeError(f"{source} holds a {type(model).__name__}, not a medgen GAN")
        first = loaded[0]
        for source, model in zip(models, loaded, strict=True):
            if (model.spatial_dims, model.value_range) != (first.spatial_dims, first.value_range):
                raise ValueError(
                    f"{source}: spatial_dims/value_range {model.spatial_dims}/"
                    f"{model.value_range} differ from the first model's {first.spatial_dims}/"
                    f"{first.value_range}"
                )
        names = list(names or [f"member{i}" for i in range(len(loaded))])
        if len(names) != len(loaded):
            raise ValueError(f"{len(names)} names for {len(loaded)} models")
        members = [
            {
                "name": name,
                "generator": dict(model.hparams["generator"] or DEFAULT_GENERATOR),
                "discriminator": dict(model.hparams["discriminator"] or DEFAULT_DISCRIMINATOR),
                "adv_loss": model.objective.adv_loss,
            }
            for name, model in zip(names, loaded, strict=True)
        ]
        kwargs.setdefault("k", min(2, len(members)))
        ensemble = cls(
            members=members,
            spatial_dims=first.spatial_dims,
            value_range=first.value_range,
            spacing=first.spacing,
            **kwargs,
        )
        for generator, model in zip(ensemble.generators, loaded, strict=True):
            generator.load_state_dict(model.generator.state_dict())
        return ensemble


_GATYS_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def _net_defaults(defaults: Mapping[str, Any], role: str) -> dict[str, Any]:
    """Shared net kwargs for a generator or discriminator; ``image_channels`` becomes the
    generator's ``out_channels`` or the discriminator's ``in_channels``."""
    out = {k: v for k, v in defaults.items() if k != "image_channels"}
    if "image_channels" in defaults:
        key = "out_channels" if role == "generator" else "in_channels"
        out[key] = defaults["image_channels"]
    return out


def _cycle(images: Tensor | None, count: int) -> Tensor | None:
    """``images[n % R]`` for ``n < count``."""
    if images is None:
        return None
    if images.shape[0] == 0:
        raise ValueError("reference/style images are empty")
    return images[torch.arange(count) % images.shape[0]]
