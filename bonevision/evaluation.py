"""Held-out evaluation of a saved model folder: predictions, metrics with bootstrap CIs, plots and report.md."""

from __future__ import annotations

import copy
import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from bonevision.metrics import binary_predictions, confusion_matrix, evaluate_predictions
from bonevision.models import normalise_label_maps
from bonevision.plots import plot_bland_altman, plot_confusion_matrix, plot_predicted_vs_true, plot_roc_curve
from bonevision.report import write_metrics_json, write_report_markdown
from bonevision.tasks import Task, get_task, has_labels, raw_targets
from bonevision.presets import RadiographEvalPreset
from bonevision.transforms import collate_tensors, make_batch_transform

logger = logging.getLogger(__name__)

FRACTURE_POSITIVE_LABEL = 0  # class id of "fractured": sensitivity and AUROC are about finding fractures


@dataclass
class Predictions:
    """Model outputs for one split, row-aligned with its `image_ids`."""

    image_ids: list[str]
    targets: np.ndarray  # class ids, or bone age in months
    outputs: np.ndarray  # class probabilities (n, num_labels), or predicted bone age in months (n,)
    male: np.ndarray | None = None


def load_model_folder(model_dir: str | Path):
    """Load a saved run's model, image processor and task name (stored in the config by `bonevision train`)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model folder (no config.json); pass the run's model/ folder")
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    normalise_label_maps(model.config)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    task_name = getattr(model.config, "bonevision_task", None)
    if task_name is None:
        raise ValueError(f"{model_dir}/config.json has no bonevision_task; it was not saved by bonevision train")
    return model, image_processor, get_task(task_name)


def predict(model, image_processor, task: Task, dataset: datasets.Dataset, args: TrainingArguments) -> Predictions:
    """Run `model` over every row of `dataset` with the evaluation preset; gathers across processes."""
    target_mean = float(getattr(model.config, "target_mean", 0.0))
    target_std = float(getattr(model.config, "target_std", 1.0))
    rows = dataset.cast_column("image", datasets.Image(decode=False))
    shorter_side = getattr(model.config, "preprocessing_shorter_side", None)
    rows.set_transform(make_batch_transform(task, RadiographEvalPreset(image_processor), target_mean=target_mean,
                                            target_std=target_std, batched_preset=True, shorter_side=shorter_side))
    trainer = Trainer(model=model, args=prediction_arguments(args), data_collator=collate_tensors)
    output = trainer.predict(rows)

    logits = np.asarray(output.predictions, dtype=np.float64)
    if len(logits) != len(dataset):
        raise RuntimeError(f"got {len(logits)} predictions for {len(dataset)} rows; evaluation lost or duplicated rows")
    if task.is_regression:
        outputs = logits.reshape(-1) * target_std + target_mean
    else:
        outputs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    male = np.asarray(dataset["male"], dtype=bool) if "male" in dataset.column_names else None
    return Predictions(image_ids=list(dataset["image_id"]), targets=raw_targets(task, dataset), outputs=outputs,
                       male=male)


def prediction_arguments(args: TrainingArguments) -> TrainingArguments:
    """Copy the run's arguments for prediction only: no evaluation loop, checkpoints or trackers."""
    args = copy.copy(args)
    args.eval_strategy = IntervalStrategy.NO
    args.save_strategy = SaveStrategy.NO
    args.load_best_model_at_end = False
    args.remove_unused_columns = False
    args.report_to = []
    args.dataloader_pin_memory = args.dataloader_pin_memory and torch.cuda.is_available()
    return args


def heldout_metrics(task: Task, predictions: Predictions, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Point estimates and seeded 95 % bootstrap CIs of the task's metrics."""
    options = {"n_resamples": n_bootstrap, "seed": seed}
    if task.is_regression:
        return evaluate_predictions("regression", targets=predictions.targets, predictions=predictions.outputs,
                                    male=predictions.male, **options)
    if task.name == "fracture":
        return evaluate_predictions("binary", labels=predictions.targets, probabilities=predictions.outputs,
                                    positive_label=FRACTURE_POSITIVE_LABEL, **options)
    return evaluate_predictions("multiclass", labels=predictions.targets, probabilities=predictions.outputs, **options)


def write_predictions_csv(path: Path, task: Task, predictions: Predictions, id2label: dict[int, str]) -> Path:
    """Write one row per image: id, truth, prediction and its probability or months."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        if task.is_regression:
            writer.writerow(["image_id", "male", "bone_age_months", "predicted_bone_age_months", "error_months"])
            for index, image_id in enumerate(predictions.image_ids):
                truth, predicted = predictions.targets[index], predictions.outputs[index]
                male = "" if predictions.male is None else bool(predictions.male[index])
                writer.writerow([image_id, male, f"{truth:.1f}", f"{predicted:.2f}", f"{predicted - truth:.2f}"])
        else:
            positive_name = id2label[FRACTURE_POSITIVE_LABEL]
            writer.writerow(["image_id", "label", "predicted_label", "probability",
                             f"probability_{positive_name.replace(' ', '_')}"])
            predicted = predicted_classes(task, predictions.outputs)
            for index, image_id in enumerate(predictions.image_ids):
                writer.writerow([image_id, id2label[int(predictions.targets[index])], id2label[int(predicted[index])],
                                 f"{predictions.outputs[index, predicted[index]]:.4f}",
                                 f"{predictions.outputs[index, FRACTURE_POSITIVE_LABEL]:.4f}"])
    return path


def predicted_classes(task: Task, probabilities: np.ndarray) -> np.ndarray:
    """Apply the decision rule of the metrics: P(fractured) >= 0.5 for fracture, the most probable class otherwise."""
    if task.name == "fracture":
        return binary_predictions(probabilities, positive_label=FRACTURE_POSITIVE_LABEL)
    return probabilities.argmax(axis=1)


def write_evaluation(output_dir: Path, task: Task, predictions: Predictions, metrics: dict, *, split: str,
                     id2label: dict[int, str], details: dict[str, str], notes: list[str]) -> Path:
    """Write metrics.json, predictions.csv, the plots and report.md into `output_dir`; return the report path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    num_samples = len(predictions.image_ids)
    write_metrics_json(metrics, output_dir / "metrics.json", split=split, num_samples=num_samples)
    write_predictions_csv(output_dir / "predictions.csv", task, predictions, id2label)

    plots: dict[str, Path] = {}
    matrix = None
    class_names = [id2label[index] for index in sorted(id2label)]
    if task.is_regression:
        plots["Predicted vs true bone age"] = plot_predicted_vs_true(predictions.targets, predictions.outputs,
                                                                     output_dir / "predicted_vs_true.png")
        plots["Bland-Altman"] = plot_bland_altman(predictions.targets, predictions.outputs,
                                                  output_dir / "bland_altman.png")
    else:
        matrix = confusion_matrix(predictions.targets, predicted_classes(task, predictions.outputs),
                                  len(class_names))
        plots["Confusion matrix"] = plot_confusion_matrix(matrix, class_names, output_dir / "confusion_matrix.png")
        if task.name == "fracture" and len(np.unique(predictions.targets)) < 2:
            notes = [*notes, "No ROC curve: the evaluated images are all of one class."]
        elif task.name == "fracture":
            plots["ROC curve"] = plot_roc_curve(predictions.targets,
                                                predictions.outputs[:, FRACTURE_POSITIVE_LABEL],
                                                output_dir / "roc_curve.png", auroc=metrics.get("auroc"),
                                                positive_label=FRACTURE_POSITIVE_LABEL)

    return write_report_markdown(output_dir / "report.md", title=f"bonevision evaluation: {task.name}",
                                 task=task.name, split=split, num_samples=num_samples, metrics=metrics, plots=plots,
                                 notes=notes, details=details, confusion_matrix=matrix, class_names=class_names)


def evaluate_split(model, image_processor, task: Task, dataset: datasets.DatasetDict, split: str, output_dir: Path,
                   args: TrainingArguments, *, n_bootstrap: int = 1000, details: dict[str, str] | None = None,
                   notes: list[str] | None = None) -> Path | None:
    """Evaluate on `split`, write the results on the main process, and return the report path there."""
    if split not in dataset:
        raise ValueError(f"split {split!r} not found; available: {', '.join(dataset)}")
    if not has_labels(task, dataset[split]):
        raise ValueError(f"split {split!r} has no labels to evaluate against; choose a labelled split")
    predictions = predict(model, image_processor, task, dataset[split], args)
    if not args.process_index == 0:
        return None
    metrics = heldout_metrics(task, predictions, n_bootstrap=n_bootstrap, seed=args.seed)
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    return write_evaluation(output_dir, task, predictions, metrics, split=split, id2label=id2label,
                            details=details or {}, notes=notes or [])
