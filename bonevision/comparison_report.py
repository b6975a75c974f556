"""Outputs of `bonevision compare`: comparison.json, comparison.md and the comparison plots.

Every link and path in these files is relative to the comparison folder, so the folder can be moved or published.
In comparison.json an undefined value (a CI with too few defined resamples) is `null`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import FuncFormatter
from sklearn.metrics import roc_curve

from bonevision.paired_bootstrap import read_predictions_csv
from bonevision.plots import new_figure, save_figure, style_roc_axes
from bonevision.report import format_metric_value

if TYPE_CHECKING:
    from bonevision.compare import BackboneResult

logger = logging.getLogger(__name__)

# Metrics shown per task, the compared one first.
TABLE_METRICS = {
    "fracture": ("auroc", "sensitivity", "specificity"),
    "bone-age": ("mae", "rmse", "r2"),
    "bone-age-bins": ("accuracy", "balanced_accuracy", "macro_f1"),
}
METRIC_LABELS = {"auroc": "AUROC", "mae": "MAE (months)", "rmse": "RMSE (months)", "r2": "R²",
                 "accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
                 "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}


def write_comparison(output_dir: Path, task_name: str, results: list[BackboneResult], differences: dict, *,
                     settings: dict, machine: dict, latency_repeats: int, warmup_passes: int,
                     note: str | None = None) -> Path:
    """Write comparison.json, the plots and comparison.md into `output_dir`; return the markdown path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    metric = differences["metric"]
    num_images = {int(result.metrics["num_samples"]) for result in results}
    splits = {result.metrics.get("split") for result in results}
    latency_method = (f"median of {latency_repeats} timed forward passes after {warmup_passes} warm-up passes, "
                      "float32, torch.inference_mode, on preprocessed held-out images (decoding and resizing "
                      f"excluded), on {machine['device']} with {machine['torch_threads']} torch threads")
    throughput_method = ("train_samples_per_second of the Trainer: training images per second of the whole "
                         "trainer.train() call, including data loading, augmentation, per-epoch validation and "
                         "checkpoint saving")

    summary = {
        "task": task_name,
        "split": splits.pop() if len(splits) == 1 else sorted(splits),
        "num_images": num_images.pop() if len(num_images) == 1 else sorted(num_images),
        "compared_metric": metric,
        "best_backbone": differences["best"],
        "settings": settings,
        "machine": machine,
        "latency_method": latency_method,
        "throughput_method": throughput_method,
        "backbones": [backbone_summary(result, differences) for result in results],
    }
    json_path = output_dir / "comparison.json"
    json_path.write_text(json.dumps(_json_ready(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")

    plots = {}
    if task_name == "fracture":
        plots["ROC curves"] = plot_roc_overlay(results, output_dir / "roc_curves.png")
    plots[f"{METRIC_LABELS[metric]} with 95% CI"] = plot_metric_with_ci(results, metric,
                                                                         output_dir / f"{metric}_by_backbone.png")
    plots[f"{METRIC_LABELS[metric]} vs parameter count"] = plot_metric_vs_parameters(
        results, metric, output_dir / f"{metric}_vs_parameters.png")

    markdown = comparison_markdown(task_name, results, differences, summary, plots, note=note)
    md_path = output_dir / "comparison.md"
    md_path.write_text(markdown, encoding="utf-8")
    logger.info("Wrote comparison %s and %s", md_path, json_path)
    return md_path


def backbone_summary(result: BackboneResult, differences: dict) -> dict:
    return {
        "backbone": result.name,
        "family": result.run_config.get("family"),
        "image_size": result.run_config.get("image_size"),
        "from_scratch": result.run_config.get("from_scratch"),
        "world_size": result.run_config.get("world_size"),
        "num_parameters": result.num_parameters,
        "train_samples_per_second": result.train_metrics.get("train_samples_per_second"),
        "train_runtime_seconds": result.train_metrics.get("train_runtime"),
        "latency_ms_per_image": {f"batch_{size}": value for size, value in result.latency_ms_per_image.items()},
        "metrics": result.metrics,
        "difference_to_best": differences["backbones"].get(result.name),
        "reused_finished_run": result.reused,
        "report": f"{result.name}/evaluation/report.md",
    }


def _json_ready(value):
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _format_with_ci(name: str, metrics: dict) -> str:
    if name not in metrics:
        return "undefined"
    value = format_metric_value(name, metrics[name])
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if low is None or high is None:
        return value
    return f"{value} ({format_metric_value(name, low)} to {format_metric_value(name, high)})"


def _format_difference(metric: str, entry: dict | None) -> str:
    if entry is None:
        return "best"
    difference = format_metric_value(metric, entry["difference"])
    if not (math.isfinite(entry["ci_low"]) and math.isfinite(entry["ci_high"])):
        return f"{difference} (CI undefined)"
    low, high = format_metric_value(metric, entry["ci_low"]), format_metric_value(metric, entry["ci_high"])
    return f"{difference} ({low} to {high}){' *' if entry['significant'] else ''}"


def _format_number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_markdown(task_name: str, results: list[BackboneResult], differences: dict, summary: dict,
                        plots: dict[str, Path], *, note: str | None) -> str:
    """Compose comparison.md: caveat, settings, the table, significant differences, methods and plots."""
    metric = differences["metric"]
    label = METRIC_LABELS[metric]
    lines = [f"# Backbone comparison: {task_name}", ""]
    if note:
        lines += [f"**{note}**", ""]
    lines += [f"Caveat: {data_size_caveat(results, metric, summary['num_images'])}", ""]

    settings = summary["settings"]
    budget = (f"max_steps {settings['max_steps']}" if settings["max_steps"] and settings["max_steps"] > 0
              else f"{settings['num_train_epochs']:g} epochs")
    lines += [f"- Held-out split: `{summary['split']}`, {summary['num_images']} images, the same for every backbone",
              f"- Shared settings: recipe `{settings['recipe'] or 'none'}`, {budget}, batch {settings['per_device_train_batch_size']}"
              f" per device, learning rate {settings['learning_rate']:g}, seed {settings['seed']}, "
              f"horizontal flips {'on' if settings['augment_hflip'] else 'off'}",
              f"- Overrides: `{' '.join(settings['overrides']) or 'none'}`",
              f"- Best backbone by {label}: **{differences['best']}**", ""]

    names = TABLE_METRICS[task_name]
    header = ["backbone", "parameters (M)", "input (px)", *[f"{METRIC_LABELS[name]} (95% CI)" for name in names],
              f"Δ{label} vs best (95% CI)", "training (images/s)", "latency batch 1 (ms/image)",
              "latency batch 32 (ms/image)"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for entry, result in zip(summary["backbones"], results):
        latency = entry["latency_ms_per_image"]
        cells = [f"[{result.name}]({entry['report']})", f"{result.num_parameters / 1e6:.2f}",
                 str(entry["image_size"]), *[_format_with_ci(name, result.metrics) for name in names],
                 _format_difference(metric, entry["difference_to_best"]),
                 _format_number(entry["train_samples_per_second"], 1),
                 _format_number(latency.get("batch_1"), 2), _format_number(latency.get("batch_32"), 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "\\* the paired 95% CI of the difference excludes 0.", ""]

    lines += ["## Significant differences", ""]
    significant = [(name, entry) for name, entry in differences["backbones"].items() if entry["significant"]]
    if significant:
        better_or_worse = {True: "better", False: "worse"}
        for name, entry in significant:
            improves = (entry["difference"] > 0) == differences["greater_is_better"]
            lines.append(f"- {name} is {better_or_worse[improves]} than {differences['best']}: "
                         f"Δ{label} {_format_difference(metric, entry).rstrip(' *')}")
    else:
        lines.append(f"- None: every paired CI of Δ{label} against {differences['best']} includes 0.")

    lines += ["", "## Method", "",
              f"- Δ{label} = {label} of the backbone minus that of the best backbone on the same images. Its CI is "
              "a paired percentile bootstrap: each replicate resamples image indices once and scores both models on "
              f"that resample ({settings['n_bootstrap']} replicates, seed {settings['seed']}). The best backbone was "
              "picked on these same images, which makes the differences to it slightly optimistic.",
              "- The per-backbone CIs are unpaired percentile-bootstrap CIs from each run's evaluation; overlapping "
              "CIs do not mean that two backbones are equivalent.",
              f"- Training throughput: {summary['throughput_method']}.",
              f"- Latency: {summary['latency_method']}.", ""]

    lines += ["## Plots", ""]
    for title, path in plots.items():
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(lines)


def data_size_caveat(results: list[BackboneResult], metric: str, num_images) -> str:
    """Write one plain sentence on how far this many held-out images can separate the backbones."""
    widths = [result.metrics[f"{metric}_ci_high"] - result.metrics[f"{metric}_ci_low"] for result in results
              if f"{metric}_ci_high" in result.metrics and f"{metric}_ci_low" in result.metrics]
    width = f"{format_metric_value(metric, float(np.median(widths)))}" if widths else "undefined"
    return (f"every figure here comes from {num_images} held-out images. The median 95% CI of "
            f"{METRIC_LABELS[metric]} is {width} wide, so smaller differences cannot be told apart from chance, and "
            "a ranking on this data may not hold on a larger test set.")


def plot_roc_overlay(results: list[BackboneResult], path: Path) -> Path:
    """Plot every backbone's ROC curve for "fractured" on one set of axes."""
    figure, axes = new_figure()
    for result in results:
        predictions = read_predictions_csv(result.run_dir / "evaluation" / "predictions.csv", "fracture")
        false_positive_rate, true_positive_rate, _ = roc_curve(predictions.targets, predictions.outputs)
        auroc = result.metrics.get("auroc")
        label = result.name if auroc is None else f"{result.name} (AUROC {auroc:.3f})"
        axes.plot(false_positive_rate, true_positive_rate, linewidth=1.8, label=label)
    style_roc_axes(axes, "ROC curves on the same held-out images", legend_fontsize="small")
    return save_figure(figure, path)


def _values_and_errors(results: list[BackboneResult], metric: str):
    values = np.array([result.metrics.get(metric, np.nan) for result in results], dtype=float)
    lows = np.array([result.metrics.get(f"{metric}_ci_low", np.nan) for result in results], dtype=float)
    highs = np.array([result.metrics.get(f"{metric}_ci_high", np.nan) for result in results], dtype=float)
    errors = np.nan_to_num(np.stack([values - lows, highs - values]), nan=0.0)
    return values, errors


def plot_metric_with_ci(results: list[BackboneResult], metric: str, path: Path) -> Path:
    """Plot each backbone's compared metric as a point with its 95% CI bar."""
    values, errors = _values_and_errors(results, metric)
    figure, axes = new_figure()
    positions = np.arange(len(results))
    axes.errorbar(positions, values, yerr=errors, fmt="o", capsize=5, color="tab:blue")
    axes.set_xticks(positions, labels=[result.name for result in results], rotation=20, ha="right")
    axes.set_ylabel(f"{METRIC_LABELS[metric]} (95% CI)")
    axes.set_title(f"Held-out {METRIC_LABELS[metric]} by backbone")
    axes.grid(alpha=0.3, axis="y")
    return save_figure(figure, path)


def plot_metric_vs_parameters(results: list[BackboneResult], metric: str, path: Path) -> Path:
    """Plot the compared metric against the parameter count (log scale), with 95% CI bars."""
    values, errors = _values_and_errors(results, metric)
    parameters = np.array([result.num_parameters / 1e6 for result in results])
    figure, axes = new_figure()
    axes.errorbar(parameters, values, yerr=errors, fmt="o", capsize=5, color="tab:blue")
    for name, x, y in zip((result.name for result in results), parameters, values):
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize="small")
    axes.set_xscale("log")
    # Plain numbers (2, 5, 10) instead of matplotlib's default 2×10^0 labels on a log axis.
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    axes.xaxis.set_minor_formatter(plain)
    axes.set_xlabel("Parameters (millions, log scale)")
    axes.set_ylabel(f"{METRIC_LABELS[metric]} (95% CI)")
    axes.set_title(f"{METRIC_LABELS[metric]} vs model size")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)
