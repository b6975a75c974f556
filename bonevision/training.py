"""Fine-tuning with the Hugging Face `Trainer`: data splits → model → transforms → train → saved model folder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from bonevision.arguments import DataArguments, ModelArguments, RunArguments
from bonevision.audit import AuditResult, audit_dataset, write_audit
from bonevision.cache import CacheSettings, default_shorter_side, prepare_cache
from bonevision.metrics import classification_metrics, multiclass_metrics, regression_metrics
from bonevision.models import (
    build_image_processor,
    build_model,
    fold_target_scale,
    get_backbone,
    load_pretrained_image_processor,
)
from bonevision.presets import RadiographEvalPreset, train_preset_for
from bonevision.splits import group_aware_split
from bonevision.tasks import Task, get_task, label_names, load_task_dataset, raw_targets
from bonevision.transforms import collate_tensors, make_batch_transform

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"


@dataclass
class TrainingOutcome:
    """The outputs of a finished training run that evaluation needs."""

    model_dir: Path
    task: Task
    dataset: datasets.DatasetDict
    trainer: Trainer
    audit: AuditResult | None = None  # of the splits as loaded, before any group-aware re-split


def resolve_precision(requested: str, training_args: TrainingArguments) -> str:
    """Set `bf16`/`fp16` on `training_args` from the requested precision and the device, and return the choice.

    bf16 runs on CUDA devices that support it and on CPUs with native bf16; fp16 only on CUDA. A request the device
    cannot honour is downgraded with a warning, never silently ignored.
    """
    on_cuda = torch.cuda.is_available() and not training_args.use_cpu
    if on_cuda:
        bf16_supported = torch.cuda.is_bf16_supported()
    else:
        bf16_supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    if requested == "auto" and bf16_supported:
        choice = "bf16"
    elif requested == "auto":
        choice = "fp16" if on_cuda else "fp32"
    elif requested == "fp16" and not on_cuda:
        choice = "bf16" if bf16_supported else "fp32"
        logger.warning("fp16 mixed precision needs a CUDA device; using %s on this CPU instead", choice)
    elif requested == "bf16" and not bf16_supported:
        choice = "fp16" if on_cuda else "fp32"
        logger.warning("this device does not support bf16; using %s instead", choice)
    else:
        choice = requested

    if training_args.fp16 or training_args.bf16:
        logger.warning("fp16/bf16 flags are replaced by the precision policy (precision=%s -> %s)", requested, choice)
    training_args.bf16 = choice == "bf16"
    training_args.fp16 = choice == "fp16"
    # transformers 5.25 gives the Accelerator `mixed_precision`, fixed in __post_init__ from the flags or from
    # `accelerate launch`'s ACCELERATE_MIXED_PRECISION, so it must follow the choice too.
    training_args.mixed_precision = choice if choice in {"bf16", "fp16"} else "no"
    logger.info("Training precision: %s", choice)
    return choice


def check_output_dir(output_dir: Path, resume: bool) -> str | None:
    """Return the checkpoint to resume from, or refuse to train over an earlier run's results."""
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume:
        if last_checkpoint is None:
            raise FileNotFoundError(f"--resume was given but no checkpoint-* folder was found in {output_dir}; train without --resume")
        logger.info("Resuming from %s", Path(last_checkpoint).name)
        return last_checkpoint
    if last_checkpoint is not None or (output_dir / MODEL_SUBDIR).exists():
        raise FileExistsError(
            f"{output_dir} already contains a training run; pass --resume to continue it or choose another --output_dir"
        )
    return None


def build_compute_metrics(task: Task, target_mean: float, target_std: float):
    """Build the `compute_metrics` used for model selection during training (point estimates, no bootstrap)."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions, dtype=np.float64)
        labels = np.asarray(prediction.label_ids)
        if task.is_regression:
            predicted_months = logits.reshape(-1) * target_std + target_mean
            true_months = labels.reshape(-1) * target_std + target_mean
            return regression_metrics(true_months, predicted_months)
        probabilities = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
        if task.name == "fracture":
            return classification_metrics(labels.astype(np.int64), probabilities, positive_label=0)
        return multiclass_metrics(labels.astype(np.int64), probabilities)

    return compute_metrics


def class_weighted_loss(weights: torch.Tensor):
    """Build a `compute_loss_func` for `Trainer`: cross-entropy weighted by the given class weights."""

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        return torch.nn.functional.cross_entropy(logits, labels, weight=weights.to(logits.device))

    return compute_loss


def freeze_all_but_head(model: torch.nn.Module) -> int:
    """Freeze every parameter except the classification head's; return the trainable parameter count.

    Batch-norm layers outside the head also stay in inference mode during training (running statistics, no updates),
    as in a Keras backbone with `trainable=False`, through a forward pre-hook that `model.train()` cannot undo.
    """
    if hasattr(model, "timm_model"):  # TimmWrapperForImageClassification
        head = model.timm_model.get_classifier()
    else:  # ViTForImageClassification
        head = model.classifier
    model.requires_grad_(False)
    head.requires_grad_(True)

    head_modules = set(head.modules())
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module not in head_modules:
            module.register_forward_pre_hook(_keep_in_inference_mode)

    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Linear probe: %d of %d parameters are trainable (the classification head)", trainable, total)
    return trainable


def _keep_in_inference_mode(module: torch.nn.Module, inputs) -> None:
    module.training = False


def select_rows(dataset: datasets.Dataset, limit: int | None, seed: int = 42) -> datasets.Dataset:
    """Select a seeded random subset of `limit` rows.

    Splits are sorted by class, so the first `limit` rows would often all be one class.
    """
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit)).flatten_indices()


def train(model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments,
          training_args: TrainingArguments) -> TrainingOutcome:
    """Fine-tune `model_args.backbone` on `data_args.task` and save the best model to `<output_dir>/model`."""
    output_dir = Path(training_args.output_dir)
    resume_checkpoint = check_output_dir(output_dir, run_args.resume)
    set_seed(training_args.seed)
    resolve_precision(run_args.precision, training_args)
    training_args.remove_unused_columns = False  # the transform needs the raw `image` column
    training_args.dataloader_pin_memory = training_args.dataloader_pin_memory and torch.cuda.is_available()

    task = get_task(data_args.task)
    if data_args.data_dir is None:
        raise ValueError("no data folder given: pass --data_dir pointing at the Kaggle download (folder or .zip)")
    backbone = get_backbone(model_args.backbone)
    shorter_side = preprocessing_shorter_side(data_args, model_args.image_size or backbone.input_size)
    # The main process builds the Arrow files; the others then read them from the cache.
    with training_args.main_process_first(desc="preparing the dataset"):
        dataset = load_task_dataset(task, data_args.data_dir, strict=data_args.strict,
                                    validation_fraction=data_args.validation_fraction,
                                    validation_labels_csv=data_args.validation_labels_csv,
                                    seed=training_args.seed, cache_dir=data_args.dataset_cache_dir)
        audit = run_leakage_audit(dataset, data_args, training_args) if data_args.audit else None
        if data_args.group_aware_split:
            if audit is None:
                raise ValueError("group_aware_split needs the leakage audit; do not set audit to false")
            dataset = group_aware_split(dataset, audit.groups(), validation_fraction=data_args.validation_fraction,
                                        seed=training_args.seed,
                                        stratify_column="label" if task.name == "fracture" else "bone_age_months")
        if data_args.preprocess_cache:
            settings = CacheSettings(shorter_side=shorter_side, image_format=data_args.cache_image_format)
            dataset = prepare_cache(dataset, settings, num_proc=data_args.preprocessing_num_workers)
    if "validation" not in dataset:
        raise ValueError(f"{data_args.data_dir} has no validation split; the task needs one for model selection")
    train_dataset = select_rows(dataset["train"], data_args.max_train_samples, training_args.seed)
    eval_dataset = select_rows(dataset["validation"], data_args.max_eval_samples, training_args.seed)

    names = label_names(task, dataset["train"])
    id2label = dict(enumerate(names))
    targets = raw_targets(task, train_dataset)
    target_mean, target_std = (float(targets.mean()), float(targets.std()) or 1.0) if task.is_regression else (0.0, 1.0)

    extra_config = {"bonevision_task": task.name, "bonevision_backbone": backbone.name,
                    "preprocessing_shorter_side": shorter_side,
                    "preprocessing_cache_format": data_args.cache_image_format if data_args.preprocess_cache else None}
    if task.is_regression:
        extra_config.update(target_mean=target_mean, target_std=target_std, target_unit="months")
    model = build_model(backbone, num_labels=len(names), id2label=id2label, problem_type=task.problem_type,
                        from_scratch=model_args.from_scratch, image_size=model_args.image_size,
                        checkpoint=model_args.checkpoint, extra_config=extra_config)
    if resume_checkpoint is not None:
        # from_pretrained maps the saved ViT key names onto the current modules. The Trainer's own resume then
        # restores the optimizer, scheduler and step.
        model = type(model).from_pretrained(resume_checkpoint)
    if model_args.linear_probe:
        freeze_all_but_head(model)
    if model_args.from_scratch:
        image_processor = build_image_processor(backbone, image_size=model_args.image_size)
    else:
        image_processor = load_pretrained_image_processor(backbone, model_args.checkpoint or backbone.checkpoint)

    train_preset = train_preset_for(image_processor, hflip=run_args.augment_hflip)
    eval_preset = RadiographEvalPreset(image_processor)
    image_cells = datasets.Image(decode=False)
    train_dataset = train_dataset.cast_column("image", image_cells)
    eval_dataset = eval_dataset.cast_column("image", image_cells)
    train_dataset.set_transform(make_batch_transform(task, train_preset, target_mean=target_mean,
                                                     target_std=target_std, shorter_side=shorter_side))
    eval_dataset.set_transform(make_batch_transform(task, eval_preset, target_mean=target_mean,
                                                    target_std=target_std, batched_preset=True,
                                                    shorter_side=shorter_side))

    configure_model_selection(task, run_args, training_args)
    callbacks = []
    if run_args.early_stopping_patience and training_args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=run_args.early_stopping_patience))

    loss_function = None
    if run_args.class_weighted_loss and not task.is_regression:
        counts = np.bincount(targets, minlength=len(names)).astype(np.float64)
        weights = counts.sum() / (len(names) * np.maximum(counts, 1.0))
        logger.info("Class weights: %s", dict(zip(names, np.round(weights, 3).tolist())))
        loss_function = class_weighted_loss(torch.tensor(weights, dtype=torch.float32))

    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=collate_tensors, processing_class=image_processor,
                      compute_metrics=build_compute_metrics(task, target_mean, target_std),
                      compute_loss_func=loss_function, callbacks=callbacks)
    logger.info("Training %s on %d images, validating on %d", backbone.name, len(train_dataset), len(eval_dataset))
    result = trainer.train(resume_from_checkpoint=resume_checkpoint)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)

    model_dir = output_dir / MODEL_SUBDIR
    final_model = best_model(trainer)
    if task.is_regression:
        fold_target_scale(final_model)
    if trainer.is_world_process_zero():
        final_model.save_pretrained(model_dir)
        image_processor.save_pretrained(model_dir)
        logger.info("Saved the model to %s", model_dir)
    trainer.accelerator.wait_for_everyone()
    return TrainingOutcome(model_dir=model_dir, task=task, dataset=dataset, trainer=trainer, audit=audit)


def best_model(trainer: Trainer):
    """Return the model to save: the best checkpoint when one was selected, loaded with `from_pretrained`.

    NOTE: with transformers 5.25, `load_best_model_at_end` loads a ViT checkpoint with `load_state_dict`, which does
    not map the legacy key names that `save_pretrained` writes, so the encoder keeps the last step's weights.
    Reloading the selected checkpoint through `from_pretrained` gives exactly the selected weights.
    """
    checkpoint = trainer.state.best_model_checkpoint
    if not trainer.args.load_best_model_at_end or checkpoint is None:
        return trainer.model
    logger.info("Saving the best checkpoint, %s", Path(checkpoint).name)
    return type(trainer.model).from_pretrained(checkpoint)


def run_leakage_audit(dataset: datasets.DatasetDict, data_args: DataArguments,
                      training_args: TrainingArguments) -> AuditResult:
    """Audit the splits for copies across them, write the report into the run folder and warn with the counts."""
    audit = audit_dataset(dataset, num_proc=data_args.preprocessing_num_workers or 1)
    summary = audit.summary()
    if training_args.process_index == 0:
        write_audit(audit, Path(training_args.output_dir) / "audit")

    cross_split = summary["exact_cross_split_pairs"] + summary["near_cross_split_pairs"]
    if cross_split:
        message = (f"leakage audit: {summary['exact_cross_split_pairs']} exact and {summary['near_cross_split_pairs']} "
                   f"near-duplicate pairs across splits; {summary.get('validation_images_with_train_near_copy', 0)} "
                   "validation images have a copy in train, so validation metrics are optimistic. "
                   "Use --group_aware_split true to re-split without leakage.")
        if data_args.fail_on_leakage:
            raise ValueError(message + " (stopped because --fail_on_leakage is set)")
        if training_args.process_index == 0:
            logger.warning(message[0].upper() + message[1:])
    else:
        logger.info("Leakage audit: no copies across splits")
    return audit


def preprocessing_shorter_side(data_args: DataArguments, input_size: int) -> int:
    """Return the shorter side in pixels that images are resized to before augmentation, cached or not."""
    shorter_side = data_args.cache_shorter_side or default_shorter_side(input_size)
    if shorter_side < input_size:
        raise ValueError(f"cache_shorter_side {shorter_side} is smaller than the model input size {input_size}; "
                         f"use at least {input_size}")
    return shorter_side


def configure_model_selection(task: Task, run_args: RunArguments, training_args: TrainingArguments) -> None:
    """Select the best checkpoint on the task's validation metric (AUROC, MAE or accuracy)."""
    if training_args.eval_strategy == "no":
        logger.warning("eval_strategy is 'no': no model selection or early stopping; the last weights are saved")
        training_args.load_best_model_at_end = False
        return
    if training_args.metric_for_best_model in (None, "loss"):
        training_args.metric_for_best_model = task.metric_for_best_model
        training_args.greater_is_better = task.greater_is_better
