"""The main job: train on a Kaggle download, then evaluate the saved model on held-out data and write a report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets import DatasetDict
from transformers import TrainingArguments

from bonevision.arguments import DataArguments, ModelArguments, RunArguments, parse_training_arguments
from bonevision.evaluation import evaluate_split, load_model_folder
from bonevision.tasks import has_labels
from bonevision.training import select_rows, train

logger = logging.getLogger(__name__)

EVALUATION_SUBDIR = "evaluation"


def heldout_split(outcome_dataset, task) -> str:
    """Choose the split for the final report: a labelled test split when there is one, else validation."""
    if "test" in outcome_dataset and has_labels(task, outcome_dataset["test"]):
        return "test"
    return "validation"


def train_and_evaluate(model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments,
                       training_args: TrainingArguments) -> Path | None:
    """Fine-tune, reload the saved folder, evaluate it on held-out data; return report.md (main process)."""
    # bonevision pushes the finished run folder with its model card, not the Trainer's checkpoints.
    push_requested = training_args.push_to_hub
    training_args.push_to_hub = False
    if push_requested and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id USER/NAME, the model repository to create or update")

    outcome = train(model_args, data_args, run_args, training_args)
    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0:
        write_data_report(outcome.dataset, output_dir)
        write_run_config(output_dir, model_args, data_args, run_args, training_args)

    split = heldout_split(outcome.dataset, outcome.task)
    notes = []
    if split == "validation":
        notes.append("The validation split also selected the best checkpoint (early stopping), so these figures "
                     "are slightly optimistic; evaluate on a test split for an unbiased estimate.")
    heldout = DatasetDict({split: select_rows(outcome.dataset[split], data_args.max_eval_samples, training_args.seed)})
    model, image_processor, task = load_model_folder(outcome.model_dir)
    details = {"model": "model/", "backbone": model_args.backbone,
               "initialisation": "random (from scratch)" if model_args.from_scratch else "pretrained",
               "data": Path(data_args.data_dir).name}
    deduplicated = None
    if outcome.audit is not None and split == "validation" and not data_args.group_aware_split:
        deduplicated = deduplicated_rows(outcome.audit, heldout[split])
    if deduplicated is not None and len(deduplicated) < len(heldout[split]):
        notes.append(f"{len(heldout[split]) - len(deduplicated)} of {len(heldout[split])} evaluated images have an "
                     "exact or near copy in the training split (leakage audit in ../audit/). Metrics on the "
                     f"{len(deduplicated)} images without one are in deduplicated/report.md.")

    report = evaluate_split(model, image_processor, task, heldout, split, output_dir / EVALUATION_SUBDIR,
                            training_args, n_bootstrap=run_args.n_bootstrap, details=details, notes=notes)
    if (deduplicated is not None and 1 < len(deduplicated) < len(heldout[split])
            and has_labels(task, deduplicated)):
        evaluate_split(model, image_processor, task, DatasetDict({split: deduplicated}), split,
                       output_dir / EVALUATION_SUBDIR / "deduplicated", training_args,
                       n_bootstrap=run_args.n_bootstrap, details=details,
                       notes=["Only the evaluated images without an exact or near copy in the training split."])
    if push_requested and training_args.process_index == 0:
        from bonevision.hub import push_run

        push_run(output_dir, training_args.hub_model_id, private=bool(training_args.hub_private_repo),
                 examples_from=data_args.data_dir, dataset_cache_dir=data_args.dataset_cache_dir)
    return report


def deduplicated_rows(audit, rows):
    """Select the rows of an evaluation split that have no exact or near copy in the training split."""
    from bonevision.audit import deduplicated_mask

    keep = deduplicated_mask(audit, "validation")
    audited_ids = [image.image_id for image in sorted((image for image in audit.images + audit.unreadable
                                                       if image.split == "validation"), key=lambda image: image.row)]
    clean_ids = {image_id for image_id, kept in zip(audited_ids, keep) if kept}
    return rows.filter(lambda image_id: image_id in clean_ids, input_columns="image_id")


def write_data_report(dataset, output_dir: Path) -> None:
    """Copy the builder's summary of skipped and ignored files into the run folder."""
    from hf_datasets._common import read_data_report

    try:
        report = read_data_report(dataset)
    except (FileNotFoundError, KeyError, ValueError) as error:
        logger.warning("No data report available for this dataset (%s)", error)
        return
    (output_dir / "data_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


# Hyperparameters recorded for the model card; paths and credentials are left out on purpose.
RECORDED_TRAINING_ARGUMENTS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "weight_decay", "warmup_steps", "lr_scheduler_type", "optim", "seed", "bf16",
    "fp16", "eval_strategy", "metric_for_best_model", "load_best_model_at_end", "label_smoothing_factor",
)


def write_run_config(output_dir: Path, model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments,
                     training_args: TrainingArguments) -> Path:
    """Record how the run was made (run_config.json), without local paths, for reports and model cards."""
    import platform

    import datasets
    import timm
    import torch
    import transformers

    from bonevision import __version__
    from bonevision.models import get_backbone
    from bonevision.tasks import get_task

    backbone = get_backbone(model_args.backbone)
    checkpoint = None if model_args.from_scratch else (model_args.checkpoint or backbone.checkpoint)
    if checkpoint is not None and Path(checkpoint).exists():
        checkpoint = None  # a local folder is not a Hub id: never record a local path
    config = {
        "task": data_args.task,
        "dataset": get_task(data_args.task).dataset,
        "data_dir_name": Path(data_args.data_dir).name,
        "validation_fraction": data_args.validation_fraction,
        "backbone": backbone.name,
        "family": backbone.family,
        "base_model": checkpoint,
        "from_scratch": model_args.from_scratch,
        "linear_probe": model_args.linear_probe,
        "image_size": model_args.image_size or backbone.input_size,
        "precision": run_args.precision,
        "class_weighted_loss": run_args.class_weighted_loss,
        "early_stopping_patience": run_args.early_stopping_patience,
        "training_arguments": {name: _plain(getattr(training_args, name)) for name in RECORDED_TRAINING_ARGUMENTS},
        "world_size": training_args.world_size,
        "versions": {"bonevision": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "timm": timm.__version__, "datasets": datasets.__version__, "python": platform.python_version()},
    }
    path = output_dir / "run_config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _plain(value):
    """Convert an argument value to a JSON-friendly form (enums by their value)."""
    return getattr(value, "value", value)


def main(argv: list[str] | None = None) -> Path | None:
    """Parse a recipe plus overrides, then train and evaluate."""
    model_args, data_args, run_args, training_args = parse_training_arguments(argv)
    report = train_and_evaluate(model_args, data_args, run_args, training_args)
    if report is not None:
        logger.info("Report: %s", report)
    return report
