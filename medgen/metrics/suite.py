"""The full evaluation of a synthetic set: fidelity, diversity, memorisation, utility, one report.

:func:`evaluate_generation` answers the four questions a hospital asks before it uses or shares
synthetic data, each with the measure the field uses:

============  ==========================================================================
question      measures
============  ==========================================================================
fidelity      Fréchet distance (FID / FD), KID, precision and density (feature space)
diversity     recall and coverage (feature space); mean MS-SSIM of random sample pairs
memorisation  nearest training image per sample, pixel and feature space; copy rate
utility       train on synthetic, test on real: AUC / Dice with confidence intervals
============  ==========================================================================

Units. Both sides are brought into one intensity scale before anything is measured: integer files
(8/16-bit) are divided by their dtype's maximum; float files are taken in their own units, mapped
to ``[0, 1]`` with ``value_range=(low, high)`` (or ``data_range`` for ``(0, data_range)``);
``real_preset`` / ``fake_preset`` (a medgen intensity preset, e.g. ``"mr"`` or the training run's
own) are applied first, e.g. to bring NIfTI files in MR scanner units into a model's ``[-1, 1]``;
``normalize="minmax"`` scales every image to ``[0, 1]`` on its own. Then the robust range
(0.5-99.5 percentile) of each side is compared: a factor above 10 between the spans, or
disjoint ranges, is an error (unless ``allow_range_mismatch``), above 2 a warning.

Every number carries the extractor record (name, weights file, SHA-256), the protocol and the
sample counts, so numbers are compared only when these agree.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from medgen.data.io import MedgenIOError, image_suffix, list_images, read
from medgen.features.registry import EXTRACTORS, build_extractor
from medgen.metrics.bootstrap import bootstrap_ci
from medgen.metrics.cache import FeatureCache, files_fingerprint
from medgen.metrics.diversity import pairwise_ms_ssim
from medgen.metrics.extraction import describe_protocol, extract_features
from medgen.metrics.fidelity import frechet_distance, kernel_inception_distance
from medgen.metrics.prdc import prdc

__all__ = ["ImageSet", "evaluate_generation", "load_image_set", "to_unit_range"]

_DTYPE_MAX = {"uint8": 255.0, "uint16": 65535.0, "bool": 1.0}


class ImageSet:
    """Images of one folder as float tensors, with their files and what was done to them."""

    def __init__(
        self,
        folder: Path,
        files: list[Path],
        images: list[Tensor],
        notes: list[str],
        integer: list[bool] | None = None,
    ) -> None:
        self.folder, self.files, self.images, self.notes = folder, files, images, notes
        #: per image: read from an 8/16-bit file (already scaled to [0, 1] by its dtype)
        self.integer = integer if integer is not None else [False] * len(images)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self.images[0].ndim - 1

    def __len__(self) -> int:
        return len(self.images)


def load_image_set(folder: str | Path, name: str, preset: Any = None) -> ImageSet:
    """Read every image of ``folder`` as float: integer files scaled to ``[0, 1]`` by their dtype.

    A folder that mixes 2D PNG files with 3D NIfTI volumes (a training run's ``samples/`` folder:
    preview grids beside the volumes) is read as its volumes, with a note. Other mixes of 2D and
    3D are an error naming a file of each.

    Args:
        folder: the folder.
        name: the CLI key it came from (``real``, ``fake``, ``train``), for messages.
        preset: an intensity preset (name, config or object, :func:`medgen.data.presets.
            get_preset`) applied to float files.
    """
    folder = Path(folder)
    files = list_images(folder)
    loaded: list[tuple[Path, Tensor, str]] = []
    for path in files:
        image = read(path)
        source = str(image.meta.get("source_dtype", str(image.dtype).removeprefix("torch.")))
        tensor = image.as_tensor()
        if tensor.ndim not in (3, 4):
            raise MedgenIOError(
                f"{path}: expected a 2D image or 3D volume, got {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise MedgenIOError(f"{path}: image contains {bad} NaN/Inf values")
        loaded.append((path, tensor, source))
    notes: list[str] = []
    dims = {t.ndim - 1 for _, t, _ in loaded}
    if dims == {2, 3}:
        flat = [p for p, t, _ in loaded if t.ndim == 3]
        volumes = [p for p, t, _ in loaded if t.ndim == 4]
        if all(image_suffix(p) == ".png" for p in flat) and all(
            image_suffix(p) in (".nii", ".nii.gz") for p in volumes
        ):
            loaded = [x for x in loaded if x[1].ndim == 4]
            notes.append(
                f"{name}: {len(flat)} PNG file(s) beside {len(volumes)} NIfTI volume(s) ignored "
                "(a run's samples/ folder: the PNGs are preview grids)"
            )
        else:
            raise MedgenIOError(
                f"{folder}: mixes 2D images ({flat[0].name}) and 3D volumes ({volumes[0].name}); "
                f"evaluate 2D and 3D data separately ({name}=...)"
            )
    images = []
    preset_fn = None
    if preset is not None:
        from medgen.data.presets import get_preset

        preset_fn = get_preset(preset)
        notes.append(f"{name}: preset {preset_fn!r} applied")
    for path, tensor, source in loaded:
        if source in _DTYPE_MAX and not tensor.is_floating_point():
            x = tensor.float() / _DTYPE_MAX[source]
            if preset_fn is not None:
                raise MedgenIOError(
                    f"{path}: {name}_preset applies to float files (NIfTI, TIFF in physical "
                    f"units), this file holds {source} values that are already scaled to [0, 1]"
                )
        else:
            x = tensor.float()
            if preset_fn is not None:
                x = torch.as_tensor(preset_fn(x)).float()
        images.append(x)
    shapes = {tuple(x.shape[0:1]) for x in images}
    if len(shapes) > 1:
        notes.append(f"{name}: channel counts differ {sorted(shapes)}; extractors average to gray")
    integer = [src in _DTYPE_MAX and not t.is_floating_point() for _, t, src in loaded]
    return ImageSet(folder, [p for p, _, _ in loaded], images, notes, integer)


def _robust_range(images: Sequence[Tensor]) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    values = []
    for x in images:
        flat = x.flatten().float()
        if len(flat) > 20000:
            flat = flat[torch.randint(0, len(flat), (20000,), generator=generator)]
        values.append(flat)
    v = torch.cat(values)
    low, high = torch.quantile(v, torch.tensor([0.005, 0.995]))
    return float(low), float(high)


def to_unit_range(
    real: ImageSet,
    fake: ImageSet,
    *,
    value_range: Sequence[float] | None = None,
    normalize: str = "none",
    allow_range_mismatch: bool = False,
    others: Sequence[ImageSet] = (),
) -> dict[str, Any]:
    """Bring every set onto ``[0, 1]`` in place (see the module docstring); return the record.

    ``value_range`` maps the images read from float files; 8/16-bit files were scaled by their
    dtype's range when read (medgen writes a model's ``value_range`` onto the full dtype range).
    """
    if normalize not in ("none", "minmax"):
        raise ValueError(f"normalize must be 'none' or 'minmax', got {normalize!r}")
    sets = [real, fake, *others]
    if normalize == "minmax":
        for s in sets:
            s.images = [(x - x.min()) / (x.max() - x.min()).clamp_min(1e-12) for x in s.images]
        record: dict[str, Any] = {"normalize": "minmax per image to [0, 1]"}
    else:
        low, high = (0.0, 1.0) if value_range is None else (float(v) for v in value_range)
        if not high > low:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
        if value_range is not None:  # float files only: 8/16-bit files are in [0, 1] already
            for s in sets:
                s.images = [
                    x if integer else (x - low) / (high - low)
                    for x, integer in zip(s.images, s.integer, strict=True)
                ]
        record = {"value_range": [low, high]}
    (a_lo, a_hi), (b_lo, b_hi) = _robust_range(real.images), _robust_range(fake.images)
    span_a, span_b = max(a_hi - a_lo, 1e-12), max(b_hi - b_lo, 1e-12)
    factor = max(span_a / span_b, span_b / span_a)
    disjoint = a_hi < b_lo or b_hi < a_lo
    record.update(
        {
            "real_range": [a_lo, a_hi],
            "fake_range": [b_lo, b_hi],
            "span_ratio": factor,
        }
    )
    message = (
        f"real images ({real.folder}) span [{a_lo:.4g}, {a_hi:.4g}] but fake "
        f"images ({fake.folder}) span [{b_lo:.4g}, {b_hi:.4g}] after scaling: they are not in the "
        "same units. Bring them together with real_preset=NAME (e.g. real_preset=mr, or "
        "preset_from=CHECKPOINT for the training run's own preset), value_range=[LOW,HIGH] "
        "for float files, or normalize=minmax"
    )
    if factor > 10 or disjoint:
        if not allow_range_mismatch:
            raise MedgenIOError(message + " (or allow_range_mismatch=true to go on anyway)")
        warnings.warn(message, stacklevel=2)
        record["warning"] = message
    elif factor > 2:
        warnings.warn(message, stacklevel=2)
        record["warning"] = message
    return record


def _few_samples_warnings(n_real: int, n_fake: int, width: int, what: str) -> list[str]:
    out = []
    n = min(n_real, n_fake)
    if n <= width:
        out.append(
            f"{what}: {n_real} real and {n_fake} fake samples for {width} features: the "
            f"covariances are singular and FD is strongly biased; a stable estimate needs more "
            f"than {width} samples per set (ideally several thousand, e.g. 2048 for Inception "
            f"as in the FID paper)"
        )
    elif n < 2 * width:
        out.append(
            f"{what}: {n} samples per set for {width} features: FD is biased upwards; use at "
            f"least {2 * width} for numbers to compare"
        )
    return out


def _distances(
    real: Tensor, fake: Tensor, *, k: int, n_boot: int, seed: int, kid_subsets: int
) -> dict[str, Any]:
    out: dict[str, Any] = {"n_real": len(real), "n_fake": len(fake), "features": real.shape[1]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="frechet_distance:")
        out["fd"] = bootstrap_ci(frechet_distance, (real, fake), n_boot=n_boot, seed=seed)
    subset = min(1000, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kid_mean, kid_std = kernel_inception_distance(
            real, fake, subsets=kid_subsets, subset_size=subset, seed=seed
        )
    out["kid"] = {"mean": kid_mean, "std": kid_std, "subsets": kid_subsets, "subset_size": subset}
    if min(len(real), len(fake)) > k:
        values = prdc(real, fake, k=k)
        for name in values:
            stat = bootstrap_ci(
                lambda a, b, name=name: prdc(a, b, k=k)[name],
                (real, fake),
                n_boot=n_boot,
                seed=seed,
            )
            out[name] = stat
        out["prdc_k"] = k
    else:
        out["prdc_skipped"] = (
            f"precision/recall/density/coverage need more than k={k} samples per set"
        )
    return out


def _protocol_for(extractor: str | nn.Module, dims: int, requested: str) -> str:
    if requested != "auto":
        return requested
    if dims == 2:
        return "2d"
    if isinstance(extractor, nn.Module):
        return "3d"
    return (
        "3d"
        if 3 in EXTRACTORS[extractor] and extractor not in ("inception_v3", "resnet50")
        else "2.5d"
    )


def evaluate_generation(
    real: str | Path,
    fake: str | Path,
    *,
    train: str | Path | None = None,
    feature_extractors: Sequence[str | nn.Module] = ("random_conv",),
    weights: dict[str, str] | None = None,
    sha256: dict[str, str] | None = None,
    protocol: str = "auto",
    center_ratio: float = 1.0,
    every_k: int = 1,
    data_range: float | None = None,
    value_range: Sequence[float] | None = None,
    real_preset: Any = None,
    fake_preset: Any = None,
    normalize: str = "none",
    allow_range_mismatch: bool = False,
    k: int = 5,
    n_boot: int = 50,
    kid_subsets: int = 100,
    diversity_pairs: int = 100,
    audit: bool = False,
    audit_options: dict[str, Any] | None = None,
    utility: dict[str, Any] | None = None,
    report_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the synthetic images in ``fake`` against the real images in ``real``.

    Args:
        real: real images the model was *not* trained on (the held-out reference), or the training
            images when no held-out set exists.
        fake: synthetic images (a folder written by ``medgen-sample``, or a run's ``samples/``).
        train: the training images; needed for ``audit=True`` (``real`` is then the held-out
            baseline; when ``train`` is ``real``, the baseline is leave-one-out); not read
            otherwise. All images of every set are held in memory.
        feature_extractors: names from :data:`medgen.features.EXTRACTORS` or modules.
        weights: ``{extractor name: local weights file}``.
        sha256: ``{extractor name: expected SHA-256}``.
        protocol: ``"auto"`` (2d for images; 3d for volumes with a 3D extractor, 2.5d with a 2D
            one), ``"2d"``, ``"2.5d"``, ``"3d"``.
        center_ratio, every_k: 2.5D slice selection (:mod:`medgen.metrics.extraction`).
        data_range, value_range: float units to ``[0, 1]`` (``data_range=R`` is ``(0, R)``).
        real_preset, fake_preset: intensity presets applied to float files of each side.
        normalize: ``"none"`` or ``"minmax"`` (per image).
        allow_range_mismatch: warn instead of failing on different intensity ranges.
        k: neighbourhood size of precision/recall/density/coverage.
        n_boot: bootstrap rounds of the confidence intervals (0: none).
        kid_subsets: KID subsets.
        diversity_pairs: random pairs for the MS-SSIM diversity.
        audit: run the memorisation audit (needs ``train``).
        audit_options: keyword arguments of :func:`medgen.metrics.audit.memorisation_audit`
            (``quantile``, ``ratio``, ``size``, ``max_shift``) and ``top_k`` for the figure.
        utility: ``{"task", "real_train", "synthetic", "real_test", "steps", ...}`` for
            :func:`medgen.metrics.utility.tstr` (labelled folders; see
            :func:`~medgen.metrics.utility.read_labelled_folder`).
        report_dir: write ``report.md``, ``report.json`` and PNG figures there.
        cache_dir: feature cache folder (``None``: no cache).
        batch_size: images per forward pass.
        device: where extractors run.
        seed: seed of bootstrap, KID subsets and diversity pairs.

    Returns:
        A JSON-friendly dict; the top-level ``fid``, ``kid_mean``, ``kid_std`` are those of the
        first extractor (plane mean for 2.5D), as in :func:`~medgen.metrics.evaluate_folders`.
    """
    if data_range is not None and value_range is not None:
        raise ValueError("give data_range or value_range, not both")
    if data_range is not None:
        if not (math.isfinite(float(data_range)) and float(data_range) > 0):
            raise ValueError(f"data_range must be a positive number, got {data_range!r}")
        value_range = (0.0, float(data_range))
    if audit and train is None:
        raise ValueError("audit=true needs train=DIR (the images the model was trained on)")
    real_set = load_image_set(real, "real", real_preset)
    fake_set = load_image_set(fake, "fake", fake_preset)
    train_set = None
    if train is not None and audit:  # the training images serve the audit only
        same = Path(train).resolve() == Path(real).resolve()
        train_set = real_set if same else load_image_set(train, "train", real_preset)
    dims = real_set.spatial_dims
    for s, key in ((fake_set, "fake"), (train_set, "train")):
        if s is not None and s.spatial_dims != dims:
            raise MedgenIOError(
                f"{s.folder}: {s.spatial_dims}D images but real ({real_set.folder}) holds {dims}D; "
                f"evaluate 2D and 3D data separately ({key}=...)"
            )
    if value_range is None and normalize == "none" and real_preset is not None:
        from medgen.data.presets import get_preset

        output_range = getattr(get_preset(real_preset), "output_range", None)
        if output_range is not None:
            value_range = tuple(float(v) for v in output_range)
            real_set.notes.append(f"value_range {list(value_range)} from the real preset")
    needs_range = value_range is None and normalize == "none"
    if needs_range:
        for s, key in ((real_set, "real"), (fake_set, "fake")):
            preset_given = (real_preset if key == "real" else fake_preset) is not None
            floats = [x for x, integer in zip(s.images, s.integer, strict=True) if not integer]
            if not floats:
                continue
            lo, hi = _robust_range(floats)
            if not preset_given and (lo < -0.05 or hi > 1.05) and s.files:
                raise MedgenIOError(
                    f"{_first_float(s)}: float values in [{lo:.4g}, {hi:.4g}] ({key}=...), not [0, 1]; "
                    "pass data_range=R or value_range=[LOW,HIGH] (the intensity scale of the "
                    "files), real_preset=NAME / preset_from=CHECKPOINT, or normalize=minmax"
                )
    others = [train_set] if train_set is not None and train_set is not real_set else []
    units = to_unit_range(
        real_set,
        fake_set,
        value_range=value_range,
        normalize=normalize,
        allow_range_mismatch=allow_range_mismatch,
        others=others,
    )
    notes = real_set.notes + fake_set.notes + (train_set.notes if others else [])
    result: dict[str, Any] = {
        "mode": "unpaired",
        "spatial_dims": dims,
        "n_real": len(real_set),
        "n_fake": len(fake_set),
        "real": str(real_set.folder),
        "fake": str(fake_set.folder),
        "units": units,
        "notes": notes,
        "warnings": [],
        "fidelity": {},
    }
    if "warning" in units:
        result["warnings"].append(units["warning"])
    cache = FeatureCache(cache_dir)
    weights = dict(weights or {})
    sha256 = dict(sha256 or {})
    first_features: dict[str, Tensor] | None = None
    for name in feature_extractors:
        key = name if isinstance(name, str) else type(name).__name__
        proto = _protocol_for(name, dims, protocol)
        extractor_dims = 3 if proto == "3d" else 2
        extractor, record = build_extractor(name, extractor_dims, weights.get(key), sha256.get(key))
        extractor = extractor.to(device)
        minmax = proto == "2.5d" and key == "radimagenet_resnet50"

        options = {
            "batch_size": batch_size,
            "center_ratio": center_ratio,
            "every_k": every_k,
            "minmax": minmax,
            "device": device,
        }
        fake_f = extract_features(fake_set.images, extractor, proto, **options)
        if isinstance(name, str):
            description = {
                "extractor": record,
                "protocol": proto,
                **{k: v for k, v in options.items() if k not in ("batch_size", "device")},
                "units": {k: v for k, v in units.items() if k in ("value_range", "normalize")},
                "preset": repr(real_preset),
                "files": files_fingerprint(real_set.files),
            }
            real_f = cache.get_or_compute(
                description,
                lambda e=extractor, p=proto, o=options: extract_features(
                    real_set.images, e, p, **o
                ),
            )
        else:
            real_f = extract_features(real_set.images, extractor, proto, **options)
        if first_features is None and proto in ("2d", "3d"):
            first_features = {"real": real_f["all"], "fake": fake_f["all"], "record": record}
        entry: dict[str, Any] = {
            **record,
            "protocol": describe_protocol(proto, center_ratio, every_k),
            "protocol_name": proto,
        }
        for plane in real_f:
            r, f = real_f[plane], fake_f[plane]
            result["warnings"] += _few_samples_warnings(
                len(r), len(f), r.shape[1], f"{key}/{plane}"
            )
            entry[plane] = _distances(r, f, k=k, n_boot=n_boot, seed=seed, kid_subsets=kid_subsets)
        if proto == "2.5d":
            entry["mean_over_planes"] = {
                "fd": sum(entry[p]["fd"]["value"] for p in real_f) / len(real_f),
                "kid": sum(entry[p]["kid"]["mean"] for p in real_f) / len(real_f),
            }
        result["fidelity"][key] = entry
    first = next(iter(result["fidelity"].values()))
    if first["protocol_name"] == "2.5d":
        result["fid"] = first["mean_over_planes"]["fd"]
        result["kid_mean"] = first["mean_over_planes"]["kid"]
        result["kid_std"] = None
    else:
        result["fid"] = first["all"]["fd"]["value"]
        result["kid_mean"] = first["all"]["kid"]["mean"]
        result["kid_std"] = first["all"]["kid"]["std"]
    result["feature_extractor"] = first["extractor"]
    result["cache"] = {
        "folder": None if cache.folder is None else str(cache.folder),
        "hits": cache.hits,
    }

    result["diversity"] = {
        "fake": pairwise_ms_ssim(
            torch.stack(_common(fake_set.images)), data_range=1.0, pairs=diversity_pairs, seed=seed
        )
        if _same_shape(fake_set.images)
        else "images of different sizes: not computed",
        "real": pairwise_ms_ssim(
            torch.stack(_common(real_set.images)), data_range=1.0, pairs=diversity_pairs, seed=seed
        )
        if _same_shape(real_set.images)
        else "images of different sizes: not computed",
    }

    audit_result = None
    if audit:
        from medgen.metrics.audit import memorisation_audit

        options = dict(audit_options or {})
        top_k = int(options.pop("top_k", 8))
        holdout = None if train_set is real_set else real_set.images
        feats = None
        if first_features is not None and train_set is not None:
            record = first_features["record"]
            ext, _ = build_extractor(
                record["extractor"]
                if isinstance(feature_extractors[0], str)
                else feature_extractors[0],
                dims,
                weights.get(record["extractor"]),
                sha256.get(record["extractor"]),
            )
            train_f = extract_features(
                train_set.images,
                ext.to(device),
                "2d" if dims == 2 else "3d",
                batch_size=batch_size,
                device=device,
            )["all"]
            feats = {"samples": first_features["fake"], "train": train_f}
            if holdout is not None:
                feats["holdout"] = first_features["real"]
        audit_result = memorisation_audit(
            fake_set.images, train_set.images, holdout, features=feats, **options
        )
        result["audit"] = audit_result.summary()
        result["audit"]["top_k"] = [
            {
                "sample": str(fake_set.files[i].name),
                "train": str(train_set.files[int(audit_result.pixel_nearest[i])].name),
                "correlation": float(audit_result.pixel_similarity[i]),
                "transform": audit_result.pixel_transform[i],
                "flagged": bool(audit_result.flagged[i]),
            }
            for i in audit_result.top_k(top_k)
        ]
        result["audit"]["flagged_files"] = [
            fake_set.files[i].name for i in result["audit"]["flagged"]
        ]

    if utility:
        result["utility"] = _utility(utility, value_range, normalize)

    if report_dir is not None:
        from medgen.metrics.report import write_report

        result["report"] = write_report(
            report_dir,
            result,
            real_set,
            fake_set,
            train_set,
            audit_result,
            top_k=int((audit_options or {}).get("top_k", 8)),
        )
    return json.loads(json.dumps(result, default=_jsonable))


def _first_float(s: ImageSet) -> Path:
    return next(p for p, integer in zip(s.files, s.integer, strict=True) if not integer)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _same_shape(images: Sequence[Tensor]) -> bool:
    return len({tuple(x.shape[1:]) for x in images}) == 1 and len(images) >= 2


def _common(images: Sequence[Tensor]) -> list[Tensor]:
    """Images with their channels averaged to one (diversity compares structure, not colour)."""
    return [x.mean(dim=0, keepdim=True) for x in images]


def _utility(cfg: dict[str, Any], value_range, normalize: str) -> dict[str, Any]:
    from medgen.metrics.utility import read_labelled_folder, tstr

    cfg = dict(cfg)
    missing = [k for k in ("real_train", "synthetic", "real_test") if not cfg.get(k)]
    if missing:
        raise ValueError(
            "utility needs labelled folders: " + ", ".join(f"utility.{k}=DIR" for k in missing)
        )
    task = cfg.pop("task", "classification")
    low, high = (0.0, 1.0) if value_range is None else (float(v) for v in value_range)

    def transform(x: Tensor) -> Tensor:
        if normalize == "minmax":
            return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
        return (x - low) / (high - low)

    def load(key: str):
        return read_labelled_folder(cfg.pop(key), task, transform)

    real_train, synthetic, real_test = load("real_train"), load("synthetic"), load("real_test")
    allowed = {"regimes", "steps", "batch_size", "lr", "seed", "n_boot", "confidence"}
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(f"unknown utility options {sorted(unknown)}; known: {sorted(allowed)}")
    return tstr(real_train, synthetic, real_test, task=task, **cfg)
