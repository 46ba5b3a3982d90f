"""Write an evaluation report: ``report.md``, ``report.json`` and PNG figures in one folder.

Figures: ``metrics.png`` (the metric table), ``samples.png`` and ``real.png`` (grids; central
axial slices of volumes), ``orthogonal.png`` (3D: the three central planes of real and synthetic
volumes), ``histograms.png`` (intensity histograms, real vs synthetic, in the common ``[0, 1]``
scale) and, after an audit, ``nearest_pairs.png`` (the closest synthetic-training pairs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medgen.metrics import figures

__all__ = ["metric_rows", "write_report"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _with_ci(stat: dict[str, Any]) -> str:
    low, high = stat.get("ci_low"), stat.get("ci_high")
    text = _fmt(stat["value"])
    if isinstance(low, float) and not math.isnan(low):
        text += f" [{_fmt(low)}, {_fmt(high)}]"
    return text


def metric_rows(result: dict[str, Any]) -> list[list[str]]:
    """Rows ``[question, measure, extractor/protocol, value [CI]]`` of a result."""
    rows: list[list[str]] = []
    for name, entry in result.get("fidelity", {}).items():
        for plane, values in entry.items():
            if plane == "mean_over_planes" or not isinstance(values, dict) or "fd" not in values:
                continue
            where = f"{name} / {entry['protocol_name']}" + (f" / {plane}" if plane != "all" else "")
            rows.append(["fidelity", "FD", where, _with_ci(values["fd"])])
            kid = values["kid"]
            rows.append(["fidelity", "KID", where, f"{_fmt(kid['mean'])} ± {_fmt(kid['std'])}"])
            for metric, question in (
                ("precision", "fidelity"),
                ("density", "fidelity"),
                ("recall", "diversity"),
                ("coverage", "diversity"),
            ):
                if metric in values:
                    rows.append([question, metric, where, _with_ci(values[metric])])
        if "mean_over_planes" in entry:
            where = f"{name} / 2.5d / mean of planes"
            rows.append(["fidelity", "FD", where, _fmt(entry["mean_over_planes"]["fd"])])
    for side in ("fake", "real"):
        d = result.get("diversity", {}).get(side)
        if isinstance(d, dict):
            rows.append(
                [
                    "diversity",
                    f"pairwise {d['measure']} ({side})",
                    f"{d['pairs']} pairs",
                    f"{_fmt(d['mean'])} [{_fmt(d['ci_low'])}, {_fmt(d['ci_high'])}]",
                ]
            )
    audit = result.get("audit")
    if audit:
        rows.append(["memorisation", "copy rate", audit["baseline"], _fmt(audit["copy_rate"])])
        px = audit["pixel"]
        rows.append(
            [
                "memorisation",
                "nearest-train correlation (median)",
                "samples / baseline",
                f"{_fmt(px['sample_to_train_median'])} / {_fmt(px['baseline_to_train_median'])}",
            ]
        )
        if "feature" in audit:
            ft = audit["feature"]
            rows.append(
                [
                    "memorisation",
                    "nearest-train feature distance (median)",
                    "samples / baseline",
                    f"{_fmt(ft['sample_to_train_median'])} / {_fmt(ft['baseline_to_train_median'])}",
                ]
            )
    utility = result.get("utility")
    if utility:
        for regime in ("real", "synthetic", "real+synthetic"):
            if regime in utility:
                rows.append(
                    [
                        "utility",
                        f"{utility['metric']} (train {regime}, test real)",
                        f"n_train={utility[regime]['n_train']}",
                        _with_ci(utility[regime]),
                    ]
                )
    return rows


def write_report(
    folder: str | Path,
    result: dict[str, Any],
    real_set: Any,
    fake_set: Any,
    train_set: Any = None,
    audit_result: Any = None,
    top_k: int = 8,
) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and the figures to ``folder``; return their paths."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    header = ["question", "measure", "extractor / protocol", "value [95% CI]"]
    rows = metric_rows(result)
    if rows:
        paths["metrics"] = str(figures.save_table(folder / "metrics.png", header, rows))
    paths["samples"] = str(figures.save_grid(folder / "samples.png", fake_set.images, "synthetic"))
    paths["real"] = str(figures.save_grid(folder / "real.png", real_set.images, "real"))
    if real_set.spatial_dims == 3:
        paths["orthogonal"] = str(
            figures.save_orthogonal(
                folder / "orthogonal.png",
                list(real_set.images[:2]) + list(fake_set.images[:2]),
                "rows 1-2 real, 3-4 synthetic",
            )
        )
    paths["histograms"] = str(
        figures.save_histograms(
            folder / "histograms.png",
            {"real": real_set.images, "synthetic": fake_set.images},
            units="common [0, 1] scale",
        )
    )
    if audit_result is not None and train_set is not None:
        paths["nearest_pairs"] = str(
            audit_result.save_pairs_figure(
                folder / "nearest_pairs.png", fake_set.images, train_set.images, k=top_k
            )
        )
    paths["json"] = str(folder / "report.json")
    paths["markdown"] = str(folder / "report.md")
    full = {**result, "report": paths}
    tmp = folder / "report.json.tmp"
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
    tmp.replace(folder / "report.json")
    (folder / "report.md").write_text(_markdown(full, header, rows, paths))
    return paths


def _markdown(result: dict[str, Any], header, rows, paths: dict[str, str]) -> str:
    lines = [
        "# Synthetic data evaluation",
        "",
        f"- real: `{result['real']}` ({result['n_real']} images)",
        f"- synthetic: `{result['fake']}` ({result['n_fake']} images)",
        f"- units: `{json.dumps(result['units'], default=str)}`",
        "",
        "Numbers are comparable only with numbers computed with the same extractor, weights "
        "(SHA-256), protocol and sample counts.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Extractors and protocols", ""]
    for name, entry in result.get("fidelity", {}).items():
        sha = entry.get("weights_sha256")
        weights = (
            f", weights `{entry['weights']}` (SHA-256 `{sha}`)" if entry.get("weights") else ""
        )
        lines.append(f"- **{name}**: {entry['description']}{weights}; {entry['protocol']}")
    audit = result.get("audit")
    if audit:
        lines += ["", "## Memorisation audit", "", f"Rule: {audit['settings']['rule']}.", ""]
        lines.append(
            f"{audit['n_flagged']} of {audit['n_samples']} samples flagged "
            f"(copy rate {_fmt(audit['copy_rate'])}); baseline: {audit['baseline']} "
            f"({audit['n_baseline']} images)."
        )
        if audit.get("flagged_files"):
            lines.append("")
            lines.append("Flagged: " + ", ".join(f"`{f}`" for f in audit["flagged_files"][:50]))
    if result.get("warnings") or result.get("notes"):
        lines += ["", "## Warnings and notes", ""]
        lines += [f"- {w}" for w in result.get("warnings", []) + result.get("notes", [])]
    lines += ["", "## Figures", ""]
    for key, path in paths.items():
        if path.endswith(".png"):
            lines.append(f"![{key}]({Path(path).name})")
    return "\n".join(lines) + "\n"
