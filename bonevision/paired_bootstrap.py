"""Paired bootstrap of the difference in a metric between two models scored on the same images.

Two models evaluated on the same held-out images make correlated errors, so their separate CIs overlap even when one
is reliably better. Resampling image indices once per replicate and scoring both models on that same resample keeps
the pairing, and the percentile CI of the per-replicate difference tests whether A is better than B on this kind of data.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonevision.metrics import MIN_DEFINED_FRACTION, classification_metrics

logger = logging.getLogger(__name__)

# A metric on (targets, outputs) that returns one float, NaN where undefined (AUROC on a one-class resample).
MetricFunction = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class PairedDifference:
    """`metric(A) - metric(B)` on the full data, with its paired percentile-bootstrap CI."""

    difference: float
    ci_low: float
    ci_high: float
    n_resamples: int
    n_defined: int  # replicates where the metric was defined for both models

    @property
    def significant(self) -> bool:
        """Whether the CI excludes 0; False when the CI is undefined."""
        return bool(np.isfinite(self.ci_low) and np.isfinite(self.ci_high) and (self.ci_low > 0 or self.ci_high < 0))


def paired_bootstrap_difference(metric: MetricFunction, targets: np.ndarray, outputs_a: np.ndarray,
                                outputs_b: np.ndarray, *, n_resamples: int = 1000, confidence: float = 0.95,
                                seed: int = 0) -> PairedDifference:
    """Bootstrap `metric(targets, outputs_a) - metric(targets, outputs_b)` over the same resampled rows.

    Rows of `targets`, `outputs_a` and `outputs_b` must describe the same images in the same order. Each replicate
    draws one set of row indices (with replacement) from `numpy.random.default_rng(seed)` and scores both models on it.
    Replicates where either metric is undefined are skipped. With fewer than `MIN_DEFINED_FRACTION` defined replicates
    the CI is NaN.
    """
    targets = np.asarray(targets)
    outputs_a = np.asarray(outputs_a)
    outputs_b = np.asarray(outputs_b)
    num_samples = len(targets)
    if num_samples == 0:
        raise ValueError("cannot bootstrap 0 images; check that the evaluation split is not empty")
    if len(outputs_a) != num_samples or len(outputs_b) != num_samples:
        raise ValueError(f"targets, outputs_a and outputs_b must have one row per image, got lengths "
                         f"{num_samples}, {len(outputs_a)} and {len(outputs_b)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")

    difference = metric(targets, outputs_a) - metric(targets, outputs_b)
    rng = np.random.default_rng(seed)
    replicates = np.full(n_resamples, np.nan)
    for replicate in range(n_resamples):
        indices = rng.integers(0, num_samples, size=num_samples)
        replicates[replicate] = metric(targets[indices], outputs_a[indices]) - metric(targets[indices],
                                                                                       outputs_b[indices])

    defined = replicates[np.isfinite(replicates)]
    if defined.size >= 2 and defined.size >= MIN_DEFINED_FRACTION * n_resamples:
        tail = (1.0 - confidence) / 2.0
        ci_low, ci_high = (float(value) for value in np.quantile(defined, [tail, 1.0 - tail]))
    else:
        logger.warning("The paired difference is defined in only %d of %d replicates; its CI is NaN",
                       defined.size, n_resamples)
        ci_low = ci_high = float("nan")
    return PairedDifference(difference=float(difference), ci_low=ci_low, ci_high=ci_high, n_resamples=n_resamples,
                            n_defined=int(defined.size))


def auroc_of_positive_scores(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of `scores` for the boolean `is_positive`; NaN when a resample contains one class only."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    # Column 0 is the positive class, as classification_metrics expects with positive_label=0.
    probabilities = np.stack([scores, 1.0 - scores], axis=1)
    labels = np.where(is_positive, 0, 1)
    return classification_metrics(labels, probabilities, positive_label=0)["auroc"]


def mean_absolute_error(targets: np.ndarray, predictions: np.ndarray) -> float:
    """MAE in the unit of the targets (months for bone age)."""
    return float(np.mean(np.abs(np.asarray(predictions, dtype=np.float64) - np.asarray(targets, dtype=np.float64))))


def accuracy_of_labels(labels: np.ndarray, predicted: np.ndarray) -> float:
    """Fraction of predicted class names equal to the true class names."""
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


@dataclass(frozen=True)
class ComparedMetric:
    """The metric a comparison ranks by, and how to read it from a predictions.csv."""

    name: str  # key in metrics.json
    greater_is_better: bool
    function: MetricFunction


COMPARED_METRICS: dict[str, ComparedMetric] = {
    "fracture": ComparedMetric("auroc", True, auroc_of_positive_scores),
    "bone-age": ComparedMetric("mae", False, mean_absolute_error),
    "bone-age-bins": ComparedMetric("accuracy", True, accuracy_of_labels),
}


@dataclass
class HeldoutPredictions:
    """One model's predictions.csv as arrays, row-aligned by `image_ids`."""

    image_ids: list[str]
    targets: np.ndarray  # fracture: is-fractured flags; bone age: months; bins: class names
    outputs: np.ndarray  # fracture: P(fractured); bone age: predicted months; bins: predicted class names


def read_predictions_csv(path: Path, task_name: str) -> HeldoutPredictions:
    """Read the predictions.csv that `bonevision.evaluation` writes, for the compared metric of `task_name`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the run's evaluation did not finish")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no rows")
    image_ids = [row["image_id"] for row in rows]

    if task_name == "bone-age":
        targets = np.array([float(row["bone_age_months"]) for row in rows])
        outputs = np.array([float(row["predicted_bone_age_months"]) for row in rows])
    elif task_name == "fracture":
        score_columns = [name for name in rows[0] if name.startswith("probability_")]
        if len(score_columns) != 1:
            raise ValueError(f"{path} must have one probability_<positive class> column, found {score_columns}")
        positive = score_columns[0].removeprefix("probability_")
        targets = np.array([row["label"].replace(" ", "_") == positive for row in rows])
        outputs = np.array([float(row[score_columns[0]]) for row in rows])
    elif task_name == "bone-age-bins":
        targets = np.array([row["label"] for row in rows])
        outputs = np.array([row["predicted_label"] for row in rows])
    else:
        raise ValueError(f"no compared metric for task {task_name!r}; choose one of: {', '.join(COMPARED_METRICS)}")
    return HeldoutPredictions(image_ids=image_ids, targets=targets, outputs=outputs)


def align_predictions(reference: HeldoutPredictions, other: HeldoutPredictions, *, reference_name: str,
                      other_name: str) -> HeldoutPredictions:
    """Reorder `other` to the image order of `reference`; raise when the two were not scored on the same images."""
    if len(set(other.image_ids)) != len(other.image_ids):
        raise ValueError(f"{other_name}'s predictions list an image_id more than once; re-run its evaluation")
    if set(reference.image_ids) != set(other.image_ids):
        missing = sorted(set(reference.image_ids) - set(other.image_ids))[:3]
        extra = sorted(set(other.image_ids) - set(reference.image_ids))[:3]
        raise ValueError(
            f"{reference_name} and {other_name} were evaluated on different images (e.g. only in {reference_name}: "
            f"{missing}, only in {other_name}: {extra}); a paired comparison needs the same split, seed, data_dir "
            "and max_eval_samples for every backbone"
        )
    position = {image_id: index for index, image_id in enumerate(other.image_ids)}
    order = np.array([position[image_id] for image_id in reference.image_ids])
    aligned = HeldoutPredictions(image_ids=list(reference.image_ids), targets=other.targets[order],
                                 outputs=other.outputs[order])
    if not np.array_equal(aligned.targets, reference.targets):
        raise ValueError(f"{reference_name} and {other_name} disagree on the ground truth of the same images; "
                         "the runs read different label files")
    return aligned

