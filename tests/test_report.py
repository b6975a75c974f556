"""Specification of bonevision.plots and bonevision.report: PNG plots, metrics JSON and report.md."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonevision.plots import plot_bland_altman, plot_confusion_matrix, plot_predicted_vs_true, plot_roc_curve
from bonevision.report import format_metric_value, write_metrics_json, write_report_markdown

CLASSIFICATION_METRICS = {
    "accuracy": 0.8125,
    "accuracy_ci_low": 0.75,
    "accuracy_ci_high": 0.875,
    "auroc": 0.91234,
    "auroc_ci_low": 0.85,
    "auroc_ci_high": 0.96,
    "specificity": float("nan"),
    "specificity_ci_low": float("nan"),
    "specificity_ci_high": float("nan"),
}

REGRESSION_METRICS = {
    "mae": 7.8617,
    "mae_ci_low": 7.5781,
    "mae_ci_high": 8.1229,
    "r2": 0.97706,
    "r2_ci_low": 0.97533,
    "r2_ci_high": 0.97878,
}


def _reject_constant(name: str) -> None:
    raise AssertionError(f"JSON contains the non-standard constant {name}")


def _read_strict_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)


def _regression_data(num_samples: int = 80) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    targets = rng.uniform(0, 228, size=num_samples)
    return targets, targets + rng.normal(0, 10, size=num_samples)


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 10_000, "a plot with axes, labels and data is well over 10 kB"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 400 <= width <= 3000
    assert 400 <= height <= 3000


def test_metrics_json_has_no_nan_or_null(tmp_path):
    path = write_metrics_json(CLASSIFICATION_METRICS, tmp_path / "metrics.json", split="validation", num_samples=64)

    data = _read_strict_json(path)

    assert None not in data.values()
    assert data["undefined_metrics"] == ["specificity", "specificity_ci_high", "specificity_ci_low"]
    assert "specificity" not in data


def test_metrics_json_flat_sorted_keys(tmp_path):
    path = write_metrics_json(
        REGRESSION_METRICS, tmp_path / "eval" / "metrics.json", split="test", num_samples=200, model="resnet50"
    )

    data = _read_strict_json(path)

    assert list(data) == sorted(data)
    assert data["split"] == "test"
    assert data["num_samples"] == 200
    assert data["model"] == "resnet50"
    assert data["mae_ci_low"] == pytest.approx(7.5781)
    assert path.read_text(encoding="utf-8").startswith('{\n  "mae"'), "indent 2"


def test_metrics_json_rejects_conflicting_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        write_metrics_json({"split": "train", "mae": 1.0}, tmp_path / "metrics.json", split="test", num_samples=3)


def test_format_months_and_rates():
    assert format_metric_value("mae", 7.8617) == "7.9"
    assert format_metric_value("mae_female", 10.04) == "10.0"
    assert format_metric_value("auroc", 0.91234) == "0.912"
    assert format_metric_value("num_images", np.int64(12)) == "12"
    assert format_metric_value("auroc", float("nan")) == "undefined"


def test_roc_curve_png(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    scores = np.array([0.9, 0.7, 0.4, 0.3, 0.6, 0.1, 0.8, 0.2])

    path = plot_roc_curve(labels, scores, tmp_path / "roc.png", auroc=0.875)

    assert path == tmp_path / "roc.png"
    _assert_png(path)


def test_roc_curve_rejects_one_class(tmp_path):
    with pytest.raises(ValueError, match="both positive"):
        plot_roc_curve(np.zeros(4, dtype=int), np.full(4, 0.5), tmp_path / "roc.png")


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix(np.array([[40, 10], [5, 45]]), ["fractured", "not fractured"], tmp_path / "cm.png")

    _assert_png(path)


def test_confusion_matrix_rejects_name_count(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        plot_confusion_matrix(np.eye(2), ["fractured"], tmp_path / "cm.png")


def test_predicted_vs_true_png(tmp_path):
    path = plot_predicted_vs_true(*_regression_data(), tmp_path / "plots" / "predicted_vs_true.png")

    _assert_png(path)


def test_bland_altman_png(tmp_path):
    path = plot_bland_altman(*_regression_data(), tmp_path / "bland_altman.png")

    _assert_png(path)


def _write_classification_report(tmp_path: Path) -> tuple[Path, str]:
    plot_dir = tmp_path / "plots"
    roc = plot_roc_curve(np.array([0, 1, 0, 1]), np.array([0.9, 0.2, 0.6, 0.4]), plot_dir / "roc curve.png")
    matrix = np.array([[30, 4], [2, 28]])
    cm = plot_confusion_matrix(matrix, ["fractured", "not fractured"], plot_dir / "confusion_matrix.png")

    path = write_report_markdown(
        tmp_path / "report" / "report.md",
        title="ViT-Base on bone fractures",
        task="binary",
        split="validation",
        num_samples=64,
        metrics=CLASSIFICATION_METRICS,
        plots={"ROC curve": roc, "Confusion matrix": cm},
        notes=["The validation split was also used for early stopping."],
        details={"model": "vit-base"},
        confusion_matrix=matrix,
        class_names=["fractured", "not fractured"],
    )
    return path, path.read_text(encoding="utf-8")


def test_report_states_split_and_count(tmp_path):
    _, text = _write_classification_report(tmp_path)

    assert text.startswith("# ViT-Base on bone fractures\n")
    assert "- Split: `validation`" in text
    assert "- Images evaluated: 64" in text
    assert "- model: vit-base" in text


def test_report_metrics_with_ci(tmp_path):
    _, text = _write_classification_report(tmp_path)

    assert "| metric | value | 95% CI |" in text
    assert "| accuracy | 0.812 | 0.750 to 0.875 |" in text
    assert "| auroc | 0.912 | 0.850 to 0.960 |" in text
    assert "| specificity | undefined | n/a |" in text


def test_report_months_one_decimal(tmp_path):
    path = write_report_markdown(
        tmp_path / "report.md",
        title="Bone age",
        task="regression",
        split="test",
        num_samples=200,
        metrics=REGRESSION_METRICS,
        plots={},
    )

    text = path.read_text(encoding="utf-8")

    assert "| mae (months) | 7.9 | 7.6 to 8.1 |" in text
    assert "| r2 | 0.977 | 0.975 to 0.979 |" in text


def test_report_lists_undefined_from_json_form(tmp_path):
    metrics = {"auroc": 0.5, "undefined_metrics": ["sensitivity", "sensitivity_ci_low", "sensitivity_ci_high"]}

    path = write_report_markdown(
        tmp_path / "report.md", title="Fractures", task="binary", split="test", num_samples=3, metrics=metrics, plots={}
    )

    assert "| sensitivity | undefined | n/a |" in path.read_text(encoding="utf-8")


def test_report_confusion_matrix_table(tmp_path):
    _, text = _write_classification_report(tmp_path)

    assert "| true \\ predicted | fractured | not fractured |" in text
    assert "| fractured | 30 | 4 |" in text
    assert "| not fractured | 2 | 28 |" in text


def test_report_notes(tmp_path):
    _, text = _write_classification_report(tmp_path)

    assert "- The validation split was also used for early stopping." in text


def test_report_links_relative_only(tmp_path):
    path, text = _write_classification_report(tmp_path)

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)

    assert links == ["../plots/roc%20curve.png", "../plots/confusion_matrix.png"]
    assert str(tmp_path) not in text
    assert str(tmp_path.resolve()) not in text
    for link in links:
        assert (path.parent / link.replace("%20", " ")).is_file(), link


def test_report_rejects_missing_plot(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report_markdown(
            tmp_path / "report.md",
            title="Fractures",
            task="binary",
            split="test",
            num_samples=1,
            metrics={},
            plots={"ROC curve": tmp_path / "missing.png"},
        )
