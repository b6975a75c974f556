"""Evaluation outputs on disk: a flat metrics JSON file and a human-readable report.md.

The JSON file never contains NaN, Infinity or null. Undefined metrics are dropped and named under
``"undefined_metrics"`` instead (see ``bonevision.metrics.to_json_safe``). The markdown report
links its plots by paths relative to the report, so the output folder can be moved or uploaded
to the Hub as a whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np

from bonevision.metrics import UNDEFINED_METRICS_KEY, to_json_safe

logger = logging.getLogger(__name__)

CI_LOW_SUFFIX = "_ci_low"
CI_HIGH_SUFFIX = "_ci_high"

# Metrics measured in months; every other float is shown with 3 decimals.
MONTH_METRIC_PREFIXES = ("mae", "rmse")

# Keys that describe the evaluation rather than measure it, so they stay out of the metrics table.
_NON_METRIC_KEYS = frozenset({"split", "num_samples", UNDEFINED_METRICS_KEY})


def write_metrics_json(
    metrics: Mapping[str, object], path: str | Path, *, split: str, num_samples: int, **extra: object
) -> Path:
    """Write metrics plus ``split``, ``num_samples`` and ``extra`` as sorted, indented JSON.

    NaN, infinite and None values are dropped and listed under ``"undefined_metrics"``, so the
    file parses with any strict JSON reader. A key given twice with different values raises
    ValueError rather than silently keeping one of them.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be a count of images, got {num_samples}")
    payload = dict(metrics)
    for name, value in {"split": split, "num_samples": num_samples, **extra}.items():
        if name in payload and payload[name] != value:
            raise ValueError(f"metrics already contain {name}={payload[name]!r}, which conflicts with {value!r}")
        payload[name] = value

    safe = to_json_safe(payload)
    if safe.get(UNDEFINED_METRICS_KEY):
        logger.warning("Undefined metrics left out of %s: %s", path, ", ".join(safe[UNDEFINED_METRICS_KEY]))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(safe, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("Wrote metrics %s", path)
    return path


def format_metric_value(name: str, value: object) -> str:
    """Format one metric for the report: months with 1 decimal, other floats with 3, counts as integers."""
    if value is None:
        return "undefined"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "undefined"
        if name.startswith(MONTH_METRIC_PREFIXES):
            return f"{value:.1f}"
        return f"{value:.3f}"
    return str(value)


def _display_name(name: str) -> str:
    return f"{name} (months)" if name.startswith(MONTH_METRIC_PREFIXES) else name


def _escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _format_interval(name: str, metrics: Mapping[str, object]) -> str:
    low = metrics.get(f"{name}{CI_LOW_SUFFIX}")
    high = metrics.get(f"{name}{CI_HIGH_SUFFIX}")
    if not (_is_number(low) and _is_number(high)) or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"{format_metric_value(name, low)} to {format_metric_value(name, high)}"


def _metric_names(metrics: Mapping[str, object]) -> list[str]:
    """List the table's metric names in the caller's order, ending with those listed as undefined."""
    names = [
        name
        for name, value in metrics.items()
        if name not in _NON_METRIC_KEYS
        and not name.endswith((CI_LOW_SUFFIX, CI_HIGH_SUFFIX))
        and (_is_number(value) or value is None)
    ]
    for name in metrics.get(UNDEFINED_METRICS_KEY, ()) or ():
        if name not in names and not name.endswith((CI_LOW_SUFFIX, CI_HIGH_SUFFIX)):
            names.append(name)
    return names


def _metrics_table(metrics: Mapping[str, object], confidence: float) -> list[str]:
    lines = [f"| metric | value | {confidence:.0%} CI |", "|---|---:|---|"]
    for name in _metric_names(metrics):
        value = format_metric_value(name, metrics.get(name))
        lines.append(f"| {_escape_cell(_display_name(name))} | {value} | {_format_interval(name, metrics)} |")
    return lines


def _confusion_matrix_table(matrix: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion_matrix must be square, got shape {matrix.shape}")
    names = list(class_names) if class_names is not None else [str(index) for index in range(matrix.shape[0])]
    if len(names) != matrix.shape[0]:
        raise ValueError(f"got {len(names)} class_names for a {matrix.shape[0]}x{matrix.shape[0]} confusion matrix")

    header = "| true \\ predicted | " + " | ".join(_escape_cell(name) for name in names) + " |"
    lines = [header, "|---|" + "---:|" * len(names)]
    for name, row in zip(names, matrix):
        cells = " | ".join(format_metric_value("count", value) for value in row.tolist())
        lines.append(f"| {_escape_cell(name)} | {cells} |")
    return lines


def _relative_link(target: str | Path, report_dir: Path) -> str:
    """Return ``target`` as a URL-quoted POSIX path relative to ``report_dir``."""
    target = Path(target).resolve()
    if not target.is_file():
        raise FileNotFoundError(f"plot {target} not found; write the plots before the report that links them")
    relative = Path(os.path.relpath(target, report_dir.resolve()))
    return quote(relative.as_posix())


def write_report_markdown(
    path: str | Path,
    *,
    title: str,
    task: str,
    split: str,
    num_samples: int,
    metrics: Mapping[str, object],
    plots: Mapping[str, str | Path],
    notes: Sequence[str] = (),
    details: Mapping[str, str] | None = None,
    confusion_matrix: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> Path:
    """Write report.md: the evaluated split, a metrics table with CIs, notes and plot images.

    ``metrics`` contains flat keys as returned by ``bootstrap_confidence_intervals`` (or the
    ``to_json_safe`` form of them). A metric ``k`` is shown with its ``k_ci_low`` to ``k_ci_high``
    interval, or "n/a" when that interval is missing. ``details`` are extra facts for the
    header, such as the model or checkpoint. ``confusion_matrix`` has true classes as rows and
    is rendered as a table. Plot paths are linked relative to the report, and a missing plot
    file raises FileNotFoundError.
    """
    path = Path(path)
    report_dir = path.parent
    report_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {title}", "", f"- Task: {task}", f"- Split: `{split}`", f"- Images evaluated: {num_samples}"]
    for key, value in (details or {}).items():
        lines.append(f"- {key}: {value}")

    lines += ["", "## Metrics", "", *_metrics_table(metrics, confidence)]

    if confusion_matrix is not None:
        lines += ["", "## Confusion matrix", "", "Rows are true classes, columns predicted classes (image counts).", ""]
        lines += _confusion_matrix_table(confusion_matrix, class_names)

    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in notes]

    if plots:
        lines += ["", "## Plots"]
        for name, plot_path in plots.items():
            lines += ["", f"### {name}", "", f"![{name}]({_relative_link(plot_path, report_dir)})"]

    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("Wrote report %s", path)
    return path
