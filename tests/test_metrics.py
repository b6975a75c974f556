"""Specification of bonevision.metrics: exact metric values, bootstrap CIs and JSON-safe output."""

import logging
import math
import re

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from bonevision.metrics import (
    binary_predictions,
    bootstrap_confidence_intervals,
    classification_metrics,
    confusion_matrix,
    evaluate_predictions,
    multiclass_metrics,
    regression_metrics,
    to_json_safe,
)

# Nine images. P(class 0) for the five class-0 images, then for the four class-1 images.
HAND_LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
HAND_P0 = np.array([0.95, 0.85, 0.70, 0.55, 0.10, 0.65, 0.60, 0.15, 0.05])
HAND_PROBABILITIES = np.stack([HAND_P0, 1.0 - HAND_P0], axis=1)


def _synthetic_classification(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=num_samples)
    p0 = np.clip(0.5 + np.where(labels == 0, 0.2, -0.2) + rng.normal(0, 0.2, num_samples), 0, 1)
    return labels, np.stack([p0, 1 - p0], axis=1)


def _synthetic_regression(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    targets = rng.uniform(0, 228, size=num_samples)
    return targets, targets + rng.normal(0, 10, size=num_samples)


def test_classification_fractured_as_positive():
    # Threshold 0.5 on P(class 0): TP 4, FN 1 (0.10), FP 2 (0.65, 0.60), TN 2.
    # AUROC: of the 5 x 4 positive/negative pairs, the positive scores higher in 4+4+4+2+1 = 15.
    result = classification_metrics(HAND_LABELS, HAND_PROBABILITIES, positive_label=0)

    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["sensitivity"] == pytest.approx(4 / 5)
    assert result["specificity"] == pytest.approx(2 / 4)
    assert result["f1"] == pytest.approx(2 * 4 / (2 * 4 + 2 + 1))
    assert result["auroc"] == pytest.approx(15 / 20)


def test_classification_class_one_as_positive():
    # Positive is class 1, predicted when P(class 1) >= 0.5, i.e. P(class 0) <= 0.5.
    # Class-1 images: 0.85 and 0.95 predicted positive (TP 2), 0.35 and 0.40 missed (FN 2).
    # Class-0 images: only 0.90 predicted positive (FP 1), TN 4.
    result = classification_metrics(HAND_LABELS, HAND_PROBABILITIES, positive_label=1)

    assert result["accuracy"] == pytest.approx(6 / 9)
    assert result["sensitivity"] == pytest.approx(2 / 4)
    assert result["specificity"] == pytest.approx(4 / 5)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert result["auroc"] == pytest.approx(15 / 20), "AUROC does not depend on which class is positive"


def test_classification_threshold_inclusive():
    probabilities = np.array([[0.5, 0.5], [0.49, 0.51]])

    predicted = binary_predictions(probabilities, positive_label=0, threshold=0.5)

    assert predicted.tolist() == [0, 1]


def test_classification_custom_threshold():
    result = classification_metrics(HAND_LABELS, HAND_PROBABILITIES, positive_label=0, threshold=0.8)

    # Only 0.95 and 0.85 reach 0.8: TP 2, FN 3, FP 0, TN 4.
    assert result["sensitivity"] == pytest.approx(2 / 5)
    assert result["specificity"] == pytest.approx(1.0)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=200)
    p0 = np.round(rng.random(200), 1)  # rounding creates many tied scores
    probabilities = np.stack([p0, 1 - p0], axis=1)

    result = classification_metrics(labels, probabilities, positive_label=0)

    assert result["auroc"] == pytest.approx(roc_auc_score(labels == 0, p0))


def test_classification_one_class_auroc_nan(caplog):
    labels = np.zeros(4, dtype=int)
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])

    with caplog.at_level(logging.WARNING, logger="bonevision.metrics"):
        result = classification_metrics(labels, probabilities, positive_label=0)

    assert math.isnan(result["auroc"])
    assert math.isnan(result["specificity"]), "no negatives, so specificity has no denominator"
    assert result["sensitivity"] == pytest.approx(3 / 4)
    assert "auroc is undefined" in caplog.text


def test_classification_rejects_logits():
    logits = np.array([[2.3, -1.0], [-0.5, 0.7]])

    with pytest.raises(ValueError, match="apply softmax"):
        classification_metrics(np.array([0, 1]), logits)


def test_classification_rejects_label_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classification_metrics(np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]))


def test_multiclass_known_values():
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    probabilities = np.eye(3)[predicted] * 0.7 + 0.1

    result = multiclass_metrics(labels, probabilities)

    assert result["accuracy"] == pytest.approx(4 / 6)
    # Recall per class: 2/3, 2/2, 0/1.
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # F1 per class: 2*2/(3+3), 2*2/(2+3), 0.
    assert result["macro_f1"] == pytest.approx((4 / 6 + 4 / 5 + 0) / 3)


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=60)
    labels[labels == 3] = 2  # class 3 is never true but can still be predicted
    probabilities = rng.dirichlet(np.ones(4), size=60)
    predicted = probabilities.argmax(axis=1)

    result = multiclass_metrics(labels, probabilities)

    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected_balanced = balanced_accuracy_score(labels, predicted)
    assert result["balanced_accuracy"] == pytest.approx(expected_balanced)
    assert result["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0.0))


def test_multiclass_rejects_string_labels():
    with pytest.raises(ValueError, match="label2id"):
        multiclass_metrics(np.array(["fractured", "not fractured"]), np.array([[0.5, 0.5], [0.5, 0.5]]))


def test_multiclass_ignores_unseen_class():
    labels = np.array([0, 1, 1])
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]])

    result = multiclass_metrics(labels, probabilities)

    assert result["macro_f1"] == pytest.approx(1.0), "class 2 is neither true nor predicted"
    assert result["balanced_accuracy"] == pytest.approx(1.0)


def test_regression_known_values():
    targets = np.array([10.0, 20.0, 30.0, 40.0])
    predictions = np.array([12.0, 18.0, 33.0, 40.0])  # errors +2, -2, +3, 0
    male = np.array([True, False, True, False])

    result = regression_metrics(targets, predictions, male=male)

    assert result["mae"] == pytest.approx(7 / 4)
    assert result["rmse"] == pytest.approx(math.sqrt(17 / 4))
    # Sum of squared errors 17, total sum of squares around the mean 25 is 500.
    assert result["r2"] == pytest.approx(1 - 17 / 500)
    assert result["mae_male"] == pytest.approx((2 + 3) / 2)
    assert result["mae_female"] == pytest.approx((2 + 0) / 2)


def test_regression_without_sex_omits_per_sex():
    result = regression_metrics(np.array([1.0, 2.0]), np.array([1.0, 3.0]))

    assert set(result) == {"mae", "rmse", "r2"}


def test_regression_accepts_integer_sex():
    result = regression_metrics(np.array([1.0, 2.0]), np.array([2.0, 2.0]), male=np.array([1, 0]))

    assert result["mae_male"] == pytest.approx(1.0)
    assert result["mae_female"] == pytest.approx(0.0)


def test_regression_one_sex_only():
    result = regression_metrics(np.array([1.0, 2.0]), np.array([2.0, 2.0]), male=np.array([True, True]))

    assert result["mae_male"] == pytest.approx(0.5)
    assert math.isnan(result["mae_female"])


def test_regression_constant_targets_r2_nan():
    result = regression_metrics(np.array([5.0, 5.0, 5.0]), np.array([4.0, 5.0, 6.0]))

    assert math.isnan(result["r2"])
    assert result["mae"] == pytest.approx(2 / 3)


def test_regression_accepts_column_predictions():
    result = regression_metrics(np.array([1.0, 2.0]), np.array([[1.5], [2.5]]))

    assert result["mae"] == pytest.approx(0.5)


def test_regression_rejects_length_mismatch():
    with pytest.raises(ValueError, match="equal length"):
        regression_metrics(np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0]))


def test_bootstrap_same_seed_same_intervals():
    labels, probabilities = _synthetic_classification(300, seed=0)

    first = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=200, seed=7)
    second = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=200, seed=7)
    other_seed = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=200, seed=8)

    assert first == second
    assert first["auroc_ci_low"] != other_seed["auroc_ci_low"]


def test_bootstrap_returns_flat_keys():
    targets, predictions = _synthetic_regression(50, seed=0)

    result = bootstrap_confidence_intervals(regression_metrics, targets, predictions, n_resamples=50)

    expected = {f"{name}{suffix}" for name in ("mae", "rmse", "r2") for suffix in ("", "_ci_low", "_ci_high")}
    assert set(result) == expected
    assert result["mae"] == pytest.approx(regression_metrics(targets, predictions)["mae"])


def test_bootstrap_ci_contains_point_estimate():
    labels, probabilities = _synthetic_classification(400, seed=1)

    result = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=300)

    for name in ("accuracy", "auroc", "sensitivity", "specificity", "f1"):
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"], name


def test_bootstrap_ci_narrows_with_more_samples():
    small = bootstrap_confidence_intervals(regression_metrics, *_synthetic_regression(100, seed=2), n_resamples=300)
    large = bootstrap_confidence_intervals(regression_metrics, *_synthetic_regression(2000, seed=2), n_resamples=300)

    small_width = small["mae_ci_high"] - small["mae_ci_low"]
    large_width = large["mae_ci_high"] - large["mae_ci_low"]
    # Width scales like 1/sqrt(n), so 20 times the samples should give about 4.5 times narrower.
    assert large_width < small_width / 3


def test_bootstrap_wider_at_higher_confidence():
    data = _synthetic_regression(200, seed=4)

    ci_80 = bootstrap_confidence_intervals(regression_metrics, *data, n_resamples=300, confidence=0.80)
    ci_99 = bootstrap_confidence_intervals(regression_metrics, *data, n_resamples=300, confidence=0.99)

    assert ci_99["mae_ci_high"] - ci_99["mae_ci_low"] > ci_80["mae_ci_high"] - ci_80["mae_ci_low"]


def test_bootstrap_perfect_predictions_zero_width():
    targets = np.linspace(0, 200, 50)

    result = bootstrap_confidence_intervals(regression_metrics, targets, targets.copy(), n_resamples=100)

    assert result["mae"] == 0.0
    assert result["mae_ci_low"] == 0.0
    assert result["mae_ci_high"] == 0.0


def test_bootstrap_resamples_sex_with_rows():
    # Male errors are all 10 months and female errors all 0, so every resample that keeps the
    # sex of each row gives exactly these per-sex MAEs.
    targets = np.arange(40, dtype=float)
    male = np.arange(40) % 2 == 0
    predictions = targets + np.where(male, 10.0, 0.0)

    result = bootstrap_confidence_intervals(regression_metrics, targets, predictions, n_resamples=100, male=male)

    assert (result["mae_male_ci_low"], result["mae_male_ci_high"]) == (10.0, 10.0)
    assert (result["mae_female_ci_low"], result["mae_female_ci_high"]) == (0.0, 0.0)


def test_bootstrap_resamples_list_kwargs():
    targets = np.arange(20, dtype=float)
    male = [index % 2 == 0 for index in range(20)]
    predictions = targets + np.where(male, 4.0, 0.0)

    result = bootstrap_confidence_intervals(regression_metrics, targets, predictions, n_resamples=50, male=male)

    assert (result["mae_male_ci_low"], result["mae_male_ci_high"]) == (4.0, 4.0)


def test_bootstrap_passes_scalar_kwargs():
    labels, probabilities = _synthetic_classification(100, seed=5)

    result = bootstrap_confidence_intervals(
        classification_metrics, labels, probabilities, n_resamples=20, positive_label=1, threshold=0.3
    )

    expected = classification_metrics(labels, probabilities, positive_label=1, threshold=0.3)
    assert result["sensitivity"] == pytest.approx(expected["sensitivity"])


def test_bootstrap_skips_one_class_resamples(caplog):
    # One fractured image out of ten: about (9/10)^10 = 35% of resamples miss it, so AUROC is
    # undefined there, yet enough resamples remain for a CI.
    labels = np.array([0] + [1] * 9)
    p0 = np.array([0.9, 0.2, 0.3, 0.1, 0.4, 0.6, 0.2, 0.1, 0.3, 0.2])
    probabilities = np.stack([p0, 1 - p0], axis=1)

    with caplog.at_level(logging.WARNING, logger="bonevision.metrics"):
        result = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=200)

    match = re.search(r"auroc is undefined in (\d+) of 200 bootstrap resamples", caplog.text)
    assert match is not None, caplog.text
    assert 30 < int(match.group(1)) < 110
    assert math.isfinite(result["auroc_ci_low"])
    assert "auroc is undefined because" not in caplog.text, "per-resample warnings are summarised, not repeated"


def test_bootstrap_all_resamples_one_class():
    labels = np.ones(6, dtype=int)
    probabilities = np.full((6, 2), 0.5)

    result = bootstrap_confidence_intervals(classification_metrics, labels, probabilities, n_resamples=50)

    assert math.isnan(result["auroc"])
    assert math.isnan(result["auroc_ci_low"])
    assert math.isnan(result["auroc_ci_high"])
    assert result["accuracy_ci_low"] == pytest.approx(0.0)


def test_bootstrap_too_few_defined_nan_ci():
    # Defined only when every row appears once, which is true of the data but of almost no resample.
    def distinct_mean(values: np.ndarray) -> dict[str, float]:
        return {"mean": float(values.mean()) if np.unique(values).size == values.size else float("nan")}

    result = bootstrap_confidence_intervals(distinct_mean, np.arange(8.0), n_resamples=100)

    assert result["mean"] == pytest.approx(3.5)
    assert math.isnan(result["mean_ci_low"])
    assert math.isnan(result["mean_ci_high"])


def test_bootstrap_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="same number of rows"):
        bootstrap_confidence_intervals(regression_metrics, np.zeros(5), np.zeros(4))


def test_evaluate_predictions_binary():
    result = evaluate_predictions(
        "binary", labels=HAND_LABELS, probabilities=HAND_PROBABILITIES, n_resamples=50, positive_label=0
    )

    assert result["auroc"] == pytest.approx(0.75)
    assert "auroc_ci_low" in result


def test_evaluate_predictions_regression_with_sex():
    targets, predictions = _synthetic_regression(30, seed=8)

    result = evaluate_predictions(
        "regression", targets=targets, predictions=predictions, male=np.arange(30) % 2 == 0, n_resamples=50
    )

    assert "mae_female_ci_high" in result


def test_evaluate_predictions_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        evaluate_predictions("segmentation", labels=np.zeros(2), probabilities=np.zeros((2, 2)))


def test_confusion_matrix_counts():
    matrix = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), num_labels=3)

    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]


def test_to_json_safe_lists_undefined():
    metrics = {"auroc": float("nan"), "auroc_ci_low": np.float32("nan"), "mae": np.float64(3.25), "n": np.int64(4)}

    safe = to_json_safe(metrics)

    assert safe == {"mae": 3.25, "n": 4, "undefined_metrics": ["auroc", "auroc_ci_low"]}
    assert type(safe["mae"]) is float
    assert type(safe["n"]) is int


def test_to_json_safe_drops_none_and_infinity():
    safe = to_json_safe({"r2": None, "rmse": float("inf"), "undefined_metrics": ["f1"]})

    assert safe == {"undefined_metrics": ["f1", "r2", "rmse"]}


def test_to_json_safe_without_undefined_has_no_key():
    assert to_json_safe({"accuracy": 0.5}) == {"accuracy": 0.5}


def test_to_json_safe_converts_arrays():
    safe = to_json_safe({"confusion_matrix": np.array([[3, 1], [0, 4]])})

    assert safe["confusion_matrix"] == [[3, 1], [0, 4]]


def test_to_json_safe_rejects_nan_inside_array():
    with pytest.raises(ValueError, match="confusion_matrix"):
        to_json_safe({"confusion_matrix": np.array([[0.5, float("nan")]])})
