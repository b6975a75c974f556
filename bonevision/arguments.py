"""Argument groups for training and evaluation, parsed with `HfArgumentParser` from a YAML recipe plus flags.

A recipe in `configs/` is a flat YAML mapping whose keys are fields of these dataclasses or of `TrainingArguments`.
Flags given on the command line override it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from bonevision.models import BACKBONES
from bonevision.tasks import TASKS

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Arguments for the network to fine-tune and its initialisation."""

    backbone: str = field(default="vit-base", metadata={"help": f"Registry name, one of: {', '.join(BACKBONES)}."})
    from_scratch: bool = field(
        default=False, metadata={"help": "Random weights from the architecture's config instead of the pretrained "
                                         "checkpoint (no download)."})
    checkpoint: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of pretrained weights in the registry entry's "
                                        "format; defaults to the registry's checkpoint."})
    image_size: int | None = field(
        default=None, metadata={"help": "Input size in pixels; defaults to the backbone's pretrained input size."})
    linear_probe: bool = field(
        default=False, metadata={"help": "Train only the classification head and freeze the rest of the network, "
                                         "batch-norm statistics included (a Keras backbone with trainable=False)."})


@dataclass
class DataArguments:
    """Arguments for the task, the download to train on and its splits."""

    task: str = field(default="fracture", metadata={"help": f"One of: {', '.join(TASKS)}."})
    data_dir: str | None = field(default=None, metadata={"help": "The Kaggle download: folder or .zip."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Bone age: fraction of training images held out for validation when the "
                                       "official validation images are absent."})
    validation_labels_csv: str | None = field(
        default=None, metadata={"help": "Bone age: CSV of the official validation labels."})
    strict: bool = field(default=False, metadata={"help": "Fail on the first unreadable image instead of skipping."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder."})
    audit: bool = field(
        default=True, metadata={"help": "Run the leakage audit (exact and near-duplicate images across splits) "
                                        "before training. Its hashes are cached, and the report goes to "
                                        "<output_dir>/audit."})
    fail_on_leakage: bool = field(
        default=False, metadata={"help": "Stop before training when the audit finds copies across splits."})
    group_aware_split: bool = field(
        default=False, metadata={"help": "Re-split the labelled data so that no near-duplicate cluster spans train "
                                         "and validation (stratified, seeded; validation_fraction sets the size)."})
    preprocess_cache: bool = field(
        default=True, metadata={"help": "Decode and resize every image once into an Arrow cache before training "
                                        "instead of decoding full-size files at every step."})
    cache_shorter_side: int | None = field(
        default=None, metadata={"help": "Shorter side of cached images in pixels (>= the model input size); "
                                        "defaults to input size x 256/224."})
    cache_image_format: str = field(
        default="jpeg", metadata={"help": "jpeg (quality 95, faster to decode) or png (lossless)."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes that build the cache (datasets' num_proc)."})


@dataclass
class RunArguments:
    """Arguments bonevision adds around `Trainer`: precision policy, loss weighting, early stopping, resuming."""

    precision: str = field(
        default="auto", metadata={"help": "auto, bf16, fp16 or fp32. auto: bf16 where the device supports it "
                                          "(CUDA or a CPU with native bf16), else fp32 (fp16 on older GPUs)."})
    class_weighted_loss: bool = field(
        default=False, metadata={"help": "Weight the cross-entropy by inverse class frequency of the training split."})
    early_stopping_patience: int | None = field(
        default=3, metadata={"help": "Evaluations without improvement of the validation metric before stopping; "
                                     "0 (or null in a recipe) disables early stopping."})
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in the output folder."})
    augment_hflip: bool = field(default=False, metadata={"help": "Random horizontal flips during training."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the 95%% confidence intervals."})

    def __post_init__(self):
        if self.precision not in {"auto", "bf16", "fp16", "fp32"}:
            raise ValueError(f"invalid precision {self.precision!r}; choose auto, bf16, fp16 or fp32")


ARGUMENT_GROUPS = (ModelArguments, DataArguments, RunArguments, TrainingArguments)


def parse_training_arguments(argv: list[str] | None = None):
    """Parse `--config RECIPE.yaml` plus overriding flags into the four argument groups."""
    config_parser = HfArgumentParser(ARGUMENT_GROUPS)
    config_parser.add_argument("--config", type=str, default=None, help="YAML recipe from configs/.")
    known, _ = config_parser.parse_known_args(argv)

    if known.config is not None:
        recipe = load_recipe(known.config)
        config_parser.set_defaults(**recipe)

    *groups, remaining = config_parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if remaining:
        raise ValueError(f"unrecognised arguments: {' '.join(remaining)}")
    # The parser appends a Namespace holding `--config`; only the dataclasses are returned.
    return tuple(group for group in groups if isinstance(group, ARGUMENT_GROUPS))


def load_recipe(path: str | Path) -> dict:
    """Read a flat YAML recipe and check that every key is a known argument."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found; see configs/ for the shipped recipes")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of argument names to values")

    known = {name for group in ARGUMENT_GROUPS for name in group.__dataclass_fields__}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"recipe {path} has unknown keys: {', '.join(unknown)}")
    return recipe
