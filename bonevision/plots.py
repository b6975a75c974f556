"""Evaluation plots written as PNG files: ROC curve, confusion matrix and bone age agreement plots.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, so this
module needs no display, never changes pyplot's global backend and leaves no open figures behind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

logger = logging.getLogger(__name__)

FIGURE_SIZE_INCHES = (5.5, 5.0)
DPI = 150


def new_figure() -> tuple[Figure, Axes]:
    """Create a figure on the Agg canvas, so pyplot's global backend is never touched."""
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Save `figure` as PNG at `path`, creating its folder, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, format="png")
    logger.info("Wrote plot %s", path)
    return path


def style_roc_axes(axes: Axes, title: str, *, legend_fontsize: str = "medium") -> None:
    """Add the chance diagonal, unit limits, axis labels, title, legend and grid of a ROC plot."""
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_aspect("equal")
    axes.set_xlabel("False positive rate (1 - specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=legend_fontsize)
    axes.grid(alpha=0.3)


def _as_paired_values(targets: np.ndarray, predictions: np.ndarray, minimum: int) -> tuple[np.ndarray, np.ndarray]:
    targets = np.asarray(targets, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    if targets.ndim != 1 or predictions.shape != targets.shape:
        raise ValueError(
            f"targets and predictions must be 1-D arrays of equal length, got {targets.shape} and {predictions.shape}"
        )
    if targets.size < minimum:
        raise ValueError(f"this plot needs at least {minimum} samples, got {targets.size}")
    return targets, predictions


def plot_roc_curve(
    labels: np.ndarray,
    scores_positive: np.ndarray,
    path: str | Path,
    *,
    auroc: float | None = None,
    title: str = "ROC curve",
    positive_label: int = 0,
) -> Path:
    """Draw the ROC curve of P(positive) against class ids ``labels`` and save it as PNG.

    ``positive_label`` is the class id counted as positive. It defaults to 0, like
    ``classification_metrics``, because bonevision's fracture task uses id 0 for "fractured".
    Pass the reported ``auroc`` to show it in the legend, because this function does not compute it.
    """
    labels = np.asarray(labels)
    scores_positive = np.asarray(scores_positive, dtype=np.float64)
    if labels.ndim != 1 or scores_positive.shape != labels.shape:
        raise ValueError(
            f"labels and scores_positive must be 1-D arrays of equal length, got {labels.shape} and {scores_positive.shape}"
        )
    is_positive = labels == positive_label
    if is_positive.all() or not is_positive.any():
        raise ValueError(
            f"an ROC curve needs both positive (class {positive_label}) and negative samples, "
            f"got {int(is_positive.sum())} positive of {labels.size}"
        )

    false_positive_rate, true_positive_rate, _ = roc_curve(is_positive, scores_positive)
    figure, axes = new_figure()
    curve_label = "model" if auroc is None else f"model (AUROC {auroc:.3f})"
    axes.plot(false_positive_rate, true_positive_rate, color="tab:blue", linewidth=2, label=curve_label)
    style_roc_axes(axes, f"{title}\n{int(is_positive.sum())} positive, {int((~is_positive).sum())} negative")
    return save_figure(figure, path)


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], path: str | Path, *, title: str = "Confusion matrix"
) -> Path:
    """Draw a count matrix (rows true class, columns predicted class) with each cell's count and save it as PNG."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square, got shape {matrix.shape}")
    if len(class_names) != matrix.shape[0]:
        raise ValueError(f"got {len(class_names)} class_names for a {matrix.shape[0]}x{matrix.shape[0]} matrix")

    figure, axes = new_figure()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, label="Images")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=30, ha="right")
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(f"{title} (n = {int(matrix.sum())})")

    # Dark cells get white text so that every count stays readable.
    midpoint = matrix.max() / 2.0 if matrix.size and matrix.max() > 0 else 0.5
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            value = matrix[row, column]
            text = f"{int(value)}" if float(value).is_integer() else f"{value:.2f}"
            color = "white" if value > midpoint else "black"
            axes.text(column, row, text, ha="center", va="center", color=color)
    return save_figure(figure, path)


def plot_predicted_vs_true(
    targets: np.ndarray,
    predictions: np.ndarray,
    path: str | Path,
    *,
    title: str = "Predicted vs true bone age",
    unit: str = "months",
) -> Path:
    """Scatter predicted against true values with the identity line and save it as PNG."""
    targets, predictions = _as_paired_values(targets, predictions, minimum=1)

    figure, axes = new_figure()
    low = float(min(targets.min(), predictions.min()))
    high = float(max(targets.max(), predictions.max()))
    margin = max(1.0, 0.05 * (high - low))
    limits = (low - margin, high + margin)
    axes.scatter(targets, predictions, s=12, alpha=0.6, color="tab:blue", edgecolors="none", label="images")
    axes.plot(limits, limits, color="grey", linestyle="--", linewidth=1, label="identity (perfect prediction)")
    axes.set_xlim(limits)
    axes.set_ylim(limits)
    axes.set_aspect("equal")
    axes.set_xlabel(f"True bone age ({unit})")
    axes.set_ylabel(f"Predicted bone age ({unit})")
    mae = float(np.mean(np.abs(predictions - targets)))
    axes.set_title(f"{title}\nn = {targets.size}, MAE = {mae:.1f} {unit}")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)


def plot_bland_altman(
    targets: np.ndarray,
    predictions: np.ndarray,
    path: str | Path,
    *,
    title: str = "Bland-Altman plot of bone age",
    unit: str = "months",
) -> Path:
    """Plot prediction minus truth against their mean, with bias and 95% limits of agreement, as PNG.

    The limits of agreement are bias +/- 1.96 sample standard deviations (ddof=1) of the
    differences, which assumes roughly normal differences.
    """
    targets, predictions = _as_paired_values(targets, predictions, minimum=2)

    means = (predictions + targets) / 2.0
    differences = predictions - targets
    bias = float(differences.mean())
    spread = 1.96 * float(differences.std(ddof=1))
    lower, upper = bias - spread, bias + spread

    figure, axes = new_figure()
    axes.scatter(means, differences, s=12, alpha=0.6, color="tab:blue", edgecolors="none", label="images")
    axes.axhline(bias, color="tab:red", linewidth=1.5, label=f"bias {bias:+.1f} {unit}")
    axes.axhline(upper, color="tab:red", linestyle="--", linewidth=1, label=f"95% limits {lower:+.1f} to {upper:+.1f} {unit}")
    axes.axhline(lower, color="tab:red", linestyle="--", linewidth=1)
    axes.axhline(0.0, color="grey", linewidth=0.8)
    axes.set_xlabel(f"Mean of predicted and true bone age ({unit})")
    axes.set_ylabel(f"Predicted - true bone age ({unit})")
    axes.set_title(f"{title}\nn = {targets.size}")
    axes.legend(loc="best", fontsize="small")
    axes.grid(alpha=0.3)
    return save_figure(figure, path)
