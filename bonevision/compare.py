"""`bonevision compare`: train several backbones under one recipe and compare them on the same held-out images.

Every backbone gets the same recipe and overrides: the same splits, seed, budget (epochs or max_steps) and
augmentation, each at its registry input size and normalisation unless `--image_size` is given for all. Each trains
into `<output-dir>/<backbone>/` through `train_and_evaluate`. A finished backbone (complete `evaluation/`) is reused on a
rerun, and an interrupted one resumes from its last `checkpoint-*`. The comparison adds parameter counts, training
throughput, inference latency and a paired bootstrap of each backbone's difference to the best one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers.trainer_utils import get_last_checkpoint

from bonevision.arguments import parse_training_arguments
from bonevision.comparison_report import write_comparison
from bonevision.evaluation import load_model_folder
from bonevision.models import get_backbone
from bonevision.paired_bootstrap import (
    COMPARED_METRICS,
    align_predictions,
    paired_bootstrap_difference,
    read_predictions_csv,
)
from bonevision.run import EVALUATION_SUBDIR, heldout_split, train_and_evaluate
from bonevision.tasks import get_task, load_task_dataset
from bonevision.training import MODEL_SUBDIR, select_rows
from bonevision.presets import RadiographEvalPreset
from bonevision.transforms import decode_image_cell

logger = logging.getLogger(__name__)

COMPARE_TASKS = tuple(COMPARED_METRICS)
# Flags that compare sets itself for every backbone; passing them as overrides would break the comparison.
MANAGED_FLAGS = ("--backbone", "--output_dir", "--task", "--resume")
LATENCY_BATCH_SIZES = (1, 32)
LATENCY_WARMUP_PASSES = 2


@dataclass
class BackboneResult:
    """Results read back from one backbone's run folder."""

    name: str
    run_dir: Path
    reused: bool
    metrics: dict
    run_config: dict
    train_metrics: dict
    num_parameters: int = 0
    latency_ms_per_image: dict[int, float] = field(default_factory=dict)


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `bonevision compare`; every unrecognised flag is passed to each training run."""
    parser.add_argument("--task", required=True, choices=COMPARE_TASKS, help="Task every backbone is trained on.")
    parser.add_argument("--backbones", nargs="+", required=True, metavar="NAME",
                        help="Registry names to compare, e.g. vit-base resnet50 xception inception-v3 vgg16.")
    parser.add_argument("--config", default=None, help="YAML recipe from configs/ shared by every backbone.")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, required=True,
                        help="Comparison folder: one sub-folder per backbone plus comparison.md/.json and plots.")
    parser.add_argument("--latency-repeats", type=int, default=10,
                        help="Timed forward passes per batch size for the latency figures (after 2 warm-up passes).")
    parser.add_argument("--note", default=None,
                        help="A line shown at the top of comparison.md, e.g. what the models are and are not.")
    return parser


def parse_compare_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse compare's own options; the rest (e.g. `--data_dir=... --max_steps=2`) lands in `overrides`."""
    parser = add_compare_arguments(argparse.ArgumentParser(prog="bonevision compare", allow_abbrev=False))
    args, overrides = parser.parse_known_args(argv)
    args.overrides = overrides
    return args


def run_compare_command(args: argparse.Namespace, overrides: list[str] | None = None) -> Path | None:
    """Run a comparison from parsed arguments; `overrides` defaults to `args.overrides` (from parse_known_args)."""
    if overrides is None:
        overrides = list(getattr(args, "overrides", []) or [])
    return compare_backbones(args.task, args.backbones, args.output_dir, config=args.config, overrides=overrides,
                             latency_repeats=args.latency_repeats, note=args.note)


def main(argv: list[str]) -> Path | None:
    """Entry point for `bonevision compare ARGS`."""
    return run_compare_command(parse_compare_arguments(argv))


def compare_backbones(task_name: str, backbones: list[str], output_dir: Path, *, config: str | None = None,
                      overrides: list[str] = (), latency_repeats: int = 10, note: str | None = None) -> Path | None:
    """Train (or reuse) every backbone, then write the comparison; return comparison.md on the main process."""
    task = get_task(task_name)
    if task.name not in COMPARED_METRICS:
        raise ValueError(f"compare supports the tasks {', '.join(COMPARE_TASKS)}, got {task_name!r}")
    if len(set(backbones)) != len(backbones) or len(backbones) < 2:
        raise ValueError(f"compare needs at least two different backbones, got {backbones}")
    for backbone in backbones:
        get_backbone(backbone)  # fail on a typo before hours of training
    for flag in overrides:
        if flag.split("=", 1)[0] in MANAGED_FLAGS:
            raise ValueError(f"{flag} cannot be overridden: compare sets {', '.join(MANAGED_FLAGS)} per backbone")
    if latency_repeats < 1:
        raise ValueError(f"--latency-repeats must be at least 1, got {latency_repeats}")
    output_dir = Path(output_dir)

    # Decide every backbone's state before training any, so all processes of a multi-process launch agree.
    plans = [(name, plan_backbone_run(output_dir / name, task.name, name)) for name in backbones]
    results = []
    is_main_process = True
    for name, state in plans:
        argv = backbone_argv(task.name, name, output_dir / name, config, overrides, resume=state == "resume")
        model_args, data_args, run_args, training_args = parse_training_arguments(argv)
        is_main_process = training_args.process_index == 0
        if state == "finished":
            check_reused_settings(output_dir / name, model_args, training_args)
            logger.info("Reusing the finished run of %s in %s", name, output_dir / name)
        else:
            logger.info("Training %s into %s%s", name, output_dir / name,
                        " (resuming from its last checkpoint)" if state == "resume" else "")
            train_and_evaluate(model_args, data_args, run_args, training_args)
        if is_main_process:
            results.append(read_backbone_result(name, output_dir / name, reused=state == "finished"))
    if not is_main_process:
        return None

    device = torch.device("cpu") if training_args.use_cpu or not torch.cuda.is_available() else torch.device("cuda")
    images = heldout_images(task, data_args, training_args.seed, max(LATENCY_BATCH_SIZES))
    for result in results:
        measure_backbone(result, images, device, latency_repeats)

    differences = paired_differences(task.name, results, n_resamples=run_args.n_bootstrap, seed=training_args.seed)
    settings = shared_settings(config, overrides, training_args, run_args)
    machine = {"device": describe_device(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    return write_comparison(output_dir, task.name, results, differences, settings=settings, machine=machine,
                            latency_repeats=latency_repeats, warmup_passes=LATENCY_WARMUP_PASSES, note=note)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} logical cores)"


def plan_backbone_run(run_dir: Path, task_name: str, backbone: str) -> str:
    """Return "finished" (reuse), "resume" (continue from a checkpoint) or "train" for one backbone's folder."""
    evaluation = run_dir / EVALUATION_SUBDIR
    if evaluation_is_complete(evaluation):
        recorded = read_json(run_dir / "run_config.json")
        if recorded.get("task") != task_name or recorded.get("backbone") != backbone:
            raise ValueError(f"{run_dir} contains a run of task {recorded.get('task')!r} with backbone "
                             f"{recorded.get('backbone')!r}, not {task_name!r} with {backbone!r}; "
                             "choose another --output-dir")
        return "finished"
    if run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None:
        return "resume"
    if (run_dir / MODEL_SUBDIR).exists():
        raise FileExistsError(f"{run_dir} contains a saved model but neither a finished evaluation nor a checkpoint to "
                              f"resume from; delete {run_dir} to retrain {backbone}")
    return "train"


# Settings that must match for a finished run to be reused; others (bf16, model selection) are rewritten by train().
REUSE_CHECKED_ARGUMENTS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                           "gradient_accumulation_steps", "weight_decay", "seed")


def check_reused_settings(run_dir: Path, model_args, training_args) -> None:
    """Raise when a finished run was trained with other settings than this comparison would use."""
    recorded = read_json(run_dir / "run_config.json")
    expected = {name: getattr(training_args, name) for name in REUSE_CHECKED_ARGUMENTS}
    expected["image_size"] = model_args.image_size or get_backbone(model_args.backbone).input_size
    expected["from_scratch"] = model_args.from_scratch
    found = {**recorded.get("training_arguments", {}), "image_size": recorded.get("image_size"),
             "from_scratch": recorded.get("from_scratch")}
    changed = [f"{name}: {found.get(name)!r} in the run, {value!r} now" for name, value in expected.items()
               if found.get(name) != value]
    if changed:
        raise ValueError(f"the finished run in {run_dir} was trained with other settings ({'; '.join(changed)}); "
                         "delete that folder to retrain it, or choose another --output-dir")


def evaluation_is_complete(evaluation: Path) -> bool:
    """Whether evaluation/ contains all three outputs; report.md is written last, so a crash leaves it missing."""
    if not all((evaluation / name).is_file() for name in ("metrics.json", "predictions.csv", "report.md")):
        return False
    try:
        metrics = json.loads((evaluation / "metrics.json").read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(metrics, dict) and "num_samples" in metrics


def backbone_argv(task_name: str, backbone: str, run_dir: Path, config: str | None, overrides: list[str], *,
                  resume: bool) -> list[str]:
    """Build one backbone's `bonevision train` arguments: the shared recipe and overrides, its name and folder."""
    argv = ["--config", str(config)] if config is not None else []
    argv += [f"--task={task_name}", f"--backbone={backbone}", f"--output_dir={run_dir}", *overrides]
    if resume:
        argv.append("--resume=true")
    return argv


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the run in {path.parent} did not finish")
    return json.loads(path.read_text())


def read_backbone_result(name: str, run_dir: Path, *, reused: bool) -> BackboneResult:
    train_results = run_dir / "train_results.json"
    return BackboneResult(name=name, run_dir=run_dir, reused=reused,
                          metrics=read_json(run_dir / EVALUATION_SUBDIR / "metrics.json"),
                          run_config=read_json(run_dir / "run_config.json"),
                          train_metrics=json.loads(train_results.read_text()) if train_results.is_file() else {})


def heldout_images(task, data_args, seed: int, size: int) -> list:
    """Decode up to `size` real held-out radiographs (PIL images) for the latency measurement."""
    dataset = load_task_dataset(task, data_args.data_dir, strict=data_args.strict,
                                validation_fraction=data_args.validation_fraction,
                                validation_labels_csv=data_args.validation_labels_csv, seed=seed,
                                cache_dir=data_args.dataset_cache_dir)
    split = heldout_split(dataset, task)
    rows = select_rows(dataset[split], data_args.max_eval_samples, seed)
    rows = rows.cast_column("image", datasets.Image(decode=False))
    count = min(size, len(rows))
    return [decode_image_cell(rows[index]["image"]) for index in range(count)]


def measure_backbone(result: BackboneResult, images: list, device: torch.device, repeats: int) -> None:
    """Count the saved model's parameters and time its forward pass at each latency batch size."""
    model, image_processor, _ = load_model_folder(result.run_dir / MODEL_SUBDIR)
    result.num_parameters = sum(parameter.numel() for parameter in model.parameters())
    pixel_values = RadiographEvalPreset(image_processor)(images)
    for batch_size in LATENCY_BATCH_SIZES:
        result.latency_ms_per_image[batch_size] = measure_latency(model, pixel_values, batch_size=batch_size,
                                                                  device=device, repeats=repeats)
    logger.info("%s: %.2f M parameters, %s ms per image", result.name, result.num_parameters / 1e6,
                ", ".join(f"batch {size}: {value:.2f}" for size, value in result.latency_ms_per_image.items()))


def measure_latency(model: torch.nn.Module, pixel_values: torch.Tensor, *, batch_size: int, device: torch.device,
                    repeats: int = 10, warmup: int = LATENCY_WARMUP_PASSES) -> float:
    """Median milliseconds per image of `model`'s forward pass on `batch_size` preprocessed images.

    Preprocessing is excluded. Batches come from `pixel_values`, cycled when it has fewer rows than `batch_size`.
    Runs in float32 under `torch.inference_mode`, after `warmup` untimed passes; CUDA is synchronised around each pass.
    """
    model = model.eval().to(device)
    available = pixel_values.shape[0]

    def batch(step: int) -> torch.Tensor:
        indices = [(step * batch_size + offset) % available for offset in range(batch_size)]
        return pixel_values[indices].to(device)

    timings = []
    with torch.inference_mode():
        for step in range(warmup + repeats):
            inputs = batch(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(pixel_values=inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1000.0 / batch_size


def paired_differences(task_name: str, results: list[BackboneResult], *, n_resamples: int, seed: int) -> dict:
    """Paired-bootstrap each backbone's compared metric against the best backbone's, on the same images."""
    compared = COMPARED_METRICS[task_name]
    ranked = [result for result in results if compared.name in result.metrics]
    if not ranked:
        raise ValueError(f"no backbone has a defined {compared.name}; the held-out split may hold one class only")
    best = (max if compared.greater_is_better else min)(ranked, key=lambda result: result.metrics[compared.name])

    reference = read_predictions_csv(best.run_dir / EVALUATION_SUBDIR / "predictions.csv", task_name)
    differences = {"metric": compared.name, "best": best.name, "greater_is_better": compared.greater_is_better,
                   "backbones": {}}
    for result in results:
        if result is best:
            continue
        other = read_predictions_csv(result.run_dir / EVALUATION_SUBDIR / "predictions.csv", task_name)
        other = align_predictions(reference, other, reference_name=best.name, other_name=result.name)
        paired = paired_bootstrap_difference(compared.function, reference.targets, other.outputs, reference.outputs,
                                             n_resamples=n_resamples, seed=seed)
        differences["backbones"][result.name] = {
            "difference": paired.difference, "ci_low": paired.ci_low, "ci_high": paired.ci_high,
            "significant": paired.significant, "n_resamples": paired.n_resamples, "n_defined": paired.n_defined,
        }
    return differences


def shared_settings(config: str | None, overrides: list[str], training_args, run_args) -> dict:
    """Collect the settings every backbone shared, for the report (no local paths)."""
    return {
        "recipe": Path(config).name if config else None,
        "overrides": overrides_without_paths(overrides),
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "learning_rate": training_args.learning_rate,
        "seed": training_args.seed,
        "augment_hflip": run_args.augment_hflip,
        "n_bootstrap": run_args.n_bootstrap,
    }


def overrides_without_paths(overrides: list[str]) -> list[str]:
    """Drop folder and file flags (`--data_dir`, `--*_csv`) with their values, so reports contain no local paths."""
    kept = []
    skip_value = False
    for flag in overrides:
        if skip_value:
            skip_value = False
            continue
        name = flag.split("=", 1)[0]
        if name.startswith("--") and name.endswith(("_dir", "_csv", "-dir", "-csv")):
            skip_value = "=" not in flag
            continue
        kept.append(flag)
    return kept
