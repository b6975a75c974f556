"""Hub model cards for bonevision runs, rendered from the run folder's own files and checked offline.

The card (README.md) is the Jinja template `model_cards/model_card_template.md` rendered through
`huggingface_hub.ModelCard.from_template`. The template contains the prose of each dataset (source, licence,
citations, known problems). This module supplies the numbers and the YAML metadata: licence, tags,
`base_model`, `datasets`, a `model-index` with the held-out metrics, and widget examples.
`validate_model_card` parses the written card back with huggingface_hub's own parsers before any upload,
because the Hub accepts a malformed card and then shows no metrics for it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id

from bonevision.models import normalise_label_maps
from bonevision.report import format_metric_value

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card_template.md"
REPOSITORY_TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME

# Licence metadata per dataset. Fracture data are attribution-only (ODC-By 1.0, CC BY 4.0), which allows
# Apache-2.0 weights with the attribution kept in the card. RSNA's research, non-commercial terms carry over
# to the weights, which the Hub expresses as `other` plus a name and a link (here LICENSE.md, uploaded with
# the model). `redistributable` is True when example images and per-image labels may be uploaded.
DATASET_LICENCES: dict[str, dict[str, Any]] = {
    "bone-fracture": {"license": "apache-2.0", "redistributable": True,
                      "pretty_name": "Bone Fracture Detection Using X-rays"},
    "rsna-bone-age": {"license": "other", "license_name": "rsna-pediatric-bone-age-challenge-terms",
                      "license_link": "LICENSE.md", "redistributable": False,
                      "pretty_name": "RSNA Pediatric Bone Age"},
}

# model-index entries per task: (key in metrics.json, metric type). Display names come from METRIC_NAMES.
MODEL_INDEX_METRICS: dict[str, list[tuple[str, str]]] = {
    "fracture": [("accuracy", "accuracy"), ("auroc", "roc_auc"), ("sensitivity", "sensitivity"),
                 ("specificity", "specificity"), ("f1", "f1")],
    "bone-age": [("mae", "mae"), ("rmse", "rmse")],
    "bone-age-bins": [("accuracy", "accuracy"), ("balanced_accuracy", "balanced_accuracy"), ("macro_f1", "f1")],
}
TASK_TITLES = {"fracture": "Fracture classification", "bone-age": "Bone age regression",
               "bone-age-bins": "Bone age bin classification"}
BASE_TAGS = ["medical-imaging", "x-ray", "radiology", "vision", "bonevision"]
TASK_TAGS = {"fracture": ["fracture-detection"], "bone-age": ["bone-age", "regression"],
             "bone-age-bins": ["bone-age"]}

METRIC_NAMES = {"accuracy": "Accuracy", "auroc": "AUROC", "sensitivity": "Sensitivity", "specificity": "Specificity",
                "f1": "F1", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1", "mae": "MAE (months)",
                "rmse": "RMSE (months)", "r2": "R²", "mae_male": "MAE, boys (months)",
                "mae_female": "MAE, girls (months)"}
AUDIT_COUNTS = {"exact_cross_split_pairs": "identical image pairs across splits",
                "near_cross_split_pairs": "near-duplicate pairs across splits",
                "validation_images_with_train_near_copy": "validation images with a near copy in training",
                "cross_label_pairs": "near-duplicate pairs with different labels"}
CI_SUFFIXES = ("_ci_low", "_ci_high")
_NON_METRIC_KEYS = {"split", "num_samples", "undefined_metrics"}
SMALL_EVALUATION = 100  # images; below this the card warns that the intervals are wide

# An absolute POSIX path (two or more segments, not inside a URL), a home-relative path, or a Windows drive path.
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])~?(?:/[\w.@+-]+){2,}/?|\b[A-Za-z]:\\[^\s\"'`|]+|file://\S+")


class ModelCardError(ValueError):
    """A model card that must not be uploaded; the message names the offending field."""


@dataclass
class RunRecord:
    """The files of a run folder that the card is made from."""

    run_dir: Path
    run_config: dict[str, Any]
    metrics: dict[str, Any]
    model_config: dict[str, Any]
    id2label: dict[int, str]
    data_report: dict[str, Any] | None
    audit: dict[str, Any] | None

    @property
    def task(self) -> str:
        return self.run_config["task"]

    @property
    def dataset(self) -> str:
        return self.run_config["dataset"]


@dataclass(frozen=True)
class CardExample:
    """An example image uploaded with the model and the model's own output on it."""

    file_name: str  # under examples/ in the repository
    title: str
    reference: str  # the ground truth, as text
    outputs: list[dict[str, Any]]  # pipeline output: [{"label": str, "score": float}, ...]

    @property
    def output_text(self) -> str:
        return ", ".join(f"{item['label']}: {item['score']:.4g}" for item in self.outputs)


def template_path() -> Path:
    """Locate the card template: the repository's `model_cards/`, else the installed `model_cards` package."""
    if REPOSITORY_TEMPLATE.is_file():
        return REPOSITORY_TEMPLATE
    try:
        installed = resources.files("model_cards") / TEMPLATE_NAME
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.is_file():
        return Path(str(installed))
    raise FileNotFoundError(f"model card template {TEMPLATE_NAME} not found in {REPOSITORY_TEMPLATE.parent} or "
                            "in the installed model_cards package; reinstall bonevision")


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Read the run folder files the card needs; missing required files raise FileNotFoundError naming them."""
    from transformers import AutoConfig

    run_dir = Path(run_dir)
    required = {"model/config.json": "train a model with `bonevision train`",
                "run_config.json": "it is written by `bonevision train`",
                "evaluation/metrics.json": "it is written by `bonevision train` or `bonevision evaluate`"}
    for relative, hint in required.items():
        if not (run_dir / relative).is_file():
            raise FileNotFoundError(f"{run_dir / relative} not found; pass a bonevision run folder ({hint})")

    config = normalise_label_maps(AutoConfig.from_pretrained(run_dir / "model"))
    run_config = _read_json(run_dir / "run_config.json")
    for key in ("task", "dataset", "backbone", "family"):
        if key not in run_config:
            raise ModelCardError(f"{run_dir / 'run_config.json'} has no {key!r}; rerun bonevision train")
    if run_config["dataset"] not in DATASET_LICENCES:
        raise ModelCardError(f"run_config.json dataset {run_config['dataset']!r} is not one of "
                             f"{', '.join(DATASET_LICENCES)}")
    audit_path = run_dir / "audit" / "audit.json"
    report_path = run_dir / "data_report.json"
    return RunRecord(run_dir=run_dir, run_config=run_config, metrics=_read_json(run_dir / "evaluation/metrics.json"),
                     model_config=config.to_dict(), id2label=dict(config.id2label),
                     data_report=_read_json(report_path) if report_path.is_file() else None,
                     audit=_read_json(audit_path) if audit_path.is_file() else None)


def build_card_data(record: RunRecord, repo_id: str, *, dataset_id: str | None = None,
                    examples: Sequence[CardExample] = ()) -> ModelCardData:
    """Build the card's YAML metadata. `datasets` lists only `dataset_id`, a Hub id, never the data folder."""
    validate_repo_id(repo_id)
    licence = DATASET_LICENCES[record.dataset]
    base_model = record.run_config.get("base_model")
    if base_model is not None:
        _check_hub_id(base_model, "base_model (from run_config.json)")
    if dataset_id is not None:
        _check_hub_id(dataset_id, "datasets (--dataset-id)")

    split = str(record.metrics.get("split", "validation"))
    eval_results = [
        EvalResult(task_type="image-classification", task_name=TASK_TITLES[record.task],
                   dataset_type=dataset_id or record.dataset, dataset_name=licence["pretty_name"],
                   dataset_split=split, metric_type=metric_type, metric_value=float(record.metrics[key]),
                   metric_name=METRIC_NAMES[key])
        for key, metric_type in MODEL_INDEX_METRICS[record.task]
        if _is_number(record.metrics.get(key))
    ]
    if not eval_results:
        raise ModelCardError(f"metrics.json of {record.run_dir} has none of the {record.task} metrics "
                             f"{[key for key, _ in MODEL_INDEX_METRICS[record.task]]}; rerun bonevision evaluate")

    extra: dict[str, Any] = {}
    if examples:
        extra["widget"] = [{"src": f"https://huggingface.co/{repo_id}/resolve/main/examples/{example.file_name}",
                            "example_title": example.title, "output": example.outputs} for example in examples]
    return ModelCardData(
        license=licence["license"], license_name=licence.get("license_name"),
        license_link=licence.get("license_link"), library_name="transformers", pipeline_tag="image-classification",
        tags=BASE_TAGS + [record.run_config["family"], _architecture_tag(record.run_config["backbone"])]
        + TASK_TAGS[record.task],
        base_model=base_model, datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({result.metric_type for result in eval_results}),
        model_name=repo_id.split("/")[-1], eval_results=eval_results, **extra)


def render_model_card(record: RunRecord, repo_id: str, *, dataset_id: str | None = None,
                      examples: Sequence[CardExample] = ()) -> ModelCard:
    """Render the card from the template; call `validate_model_card` on the written file before uploading."""
    card_data = build_card_data(record, repo_id, dataset_id=dataset_id, examples=examples)
    context = template_context(record, repo_id, examples)
    return ModelCard.from_template(card_data, template_path=str(template_path()), **context)


def template_context(record: RunRecord, repo_id: str, examples: Sequence[CardExample] = ()) -> dict[str, Any]:
    """Compute the values the template's body uses from the run's files."""
    run_config, metrics = record.run_config, record.metrics
    is_regression = record.task == "bone-age"
    model_name = repo_id.split("/")[-1]
    if is_regression:
        usage = [f'estimator = pipeline("image-classification", model="{repo_id}", function_to_apply="none")',
                 'months = estimator("hand_radiograph.png")[0]["score"]  # bone age in months']
    else:
        usage = [f'classifier = pipeline("image-classification", model="{repo_id}")',
                 'print(classifier("radiograph.png"))']
    num_samples = int(metrics.get("num_samples", 0))
    report = record.data_report or {}
    split_source = report.get("split_source")
    return {
        "title": model_name, "task_name": record.task, "dataset_name": record.dataset,
        "family": run_config["family"], "is_regression": is_regression,
        "architecture": _architecture_text(record), "parameters": _parameter_text(record.run_dir / "model"),
        "bonevision_version": run_config.get("versions", {}).get("bonevision", "(unknown version)"),
        "image_size": run_config.get("image_size", "?"), "base_model": run_config.get("base_model"),
        "from_scratch": bool(run_config.get("from_scratch")),
        "label_names": [record.id2label[index] for index in sorted(record.id2label)],
        "usage_lines": usage, "examples": list(examples), "split": metrics.get("split", "validation"),
        "splits": _counts_text(report.get("splits")),
        "split_source": split_source if split_source not in (None, "folders") else None,
        "class_counts": _counts_text((report.get("class_counts") or {}).get("train")),
        "num_skipped": report.get("num_skipped", 0), "audit_text": audit_text(record.audit),
        "split_text": split_text(record), "metric_rows": metric_rows(metrics),
        "undefined_metrics": list(metrics.get("undefined_metrics", [])),
        "num_samples": num_samples, "small_evaluation": num_samples < SMALL_EVALUATION,
        "shorter_side": record.model_config.get("preprocessing_shorter_side"),
        "hyperparameters": hyperparameter_rows(run_config),
        "versions": [{"name": name, "value": value} for name, value in sorted(run_config.get("versions", {}).items())],
    }


def split_text(record: RunRecord) -> str:
    """Describe the split the metrics come from, and whether it also selected the checkpoint."""
    split = record.metrics.get("split", "validation")
    count = record.metrics.get("num_samples", "?")
    arguments = record.run_config.get("training_arguments", {})
    if split != "validation":
        return (f"Evaluated on the held-out `{split}` split ({count} images), which was used neither for training "
                "nor for model selection.")
    if arguments.get("load_best_model_at_end") and arguments.get("eval_strategy", "no") != "no":
        selection = arguments.get("metric_for_best_model") or "the validation loss"
        return (f"Evaluated on the `validation` split ({count} images). The same split selected the best checkpoint "
                f"during training (on `{selection}`), so these figures are optimistic: no separate labelled test "
                "split was available.")
    return f"Evaluated on the `validation` split ({count} images), which did not select the checkpoint."


def audit_text(audit: dict[str, Any] | None) -> str:
    """Describe the leakage audit's counts in one paragraph, or state that no audit was run."""
    if audit is None:
        return ("No leakage audit was run for this model (the run folder has no `audit/audit.json`), so exact and "
                "near duplicates between the training and evaluation images were not checked.")
    counts = {key: _count(audit.get(key)) for key in AUDIT_COUNTS}
    found = [f"{value} {AUDIT_COUNTS[key]}" for key, value in counts.items() if value is not None]
    text = f"A leakage audit of {_count(audit.get('num_images')) or 'the'} images found " + ", ".join(found) + "."
    if any(counts.values()):
        text += " Images shared across splits make the evaluation figures optimistic."
    else:
        text += " No image was found in more than one split."
    return text


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """List each metric with its value and 95% CI, in the order of metrics.json, for the body's table."""
    rows = []
    for name, value in metrics.items():
        if name in _NON_METRIC_KEYS or name.endswith(CI_SUFFIXES) or not _is_number(value):
            continue
        low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
        interval = (f"{format_metric_value(name, low)} to {format_metric_value(name, high)}"
                    if _is_number(low) and _is_number(high) else "not computed")
        rows.append({"name": METRIC_NAMES.get(name, name), "value": format_metric_value(name, value),
                     "interval": interval})
    return rows


def hyperparameter_rows(run_config: dict[str, Any]) -> list[dict[str, Any]]:
    """List the recorded training settings (run_config.json records no paths)."""
    keys = ("backbone", "from_scratch", "linear_probe", "image_size", "precision", "class_weighted_loss",
            "early_stopping_patience", "world_size")
    settings = {key: run_config.get(key) for key in keys}
    settings.update(run_config.get("training_arguments", {}))
    return [{"name": name, "value": value} for name, value in settings.items() if value is not None]


def validate_model_card(readme_path: str | Path, *, forbidden_paths: Iterable[str | Path] = ()) -> dict[str, Any]:
    """Parse a written card back and check what the Hub needs; return its metadata.

    Checks that:
    - the YAML parses with `metadata_load`, the required fields are set and no value is null;
    - `base_model` and `datasets` are Hub ids, not local paths;
    - the `model-index` converts with `model_index_to_eval_results`, with finite numbers as values;
    - widget images are Hub URLs;
    - the text contains no absolute local path and none of `forbidden_paths`.
    Raises ModelCardError naming the field.
    """
    readme_path = Path(readme_path)
    metadata = metadata_load(readme_path)
    if not metadata:
        raise ModelCardError(f"{readme_path} has no YAML metadata block")
    _check_no_nulls(metadata, "")
    for key in ("license", "library_name", "pipeline_tag", "tags", "model-index"):
        if key not in metadata:
            raise ModelCardError(f"model card metadata field {key!r} is missing")
    if metadata["license"] == "other" and not (metadata.get("license_name") and metadata.get("license_link")):
        raise ModelCardError("model card field 'license' is 'other' but license_name or license_link is missing")
    if metadata["pipeline_tag"] != "image-classification":
        raise ModelCardError(f"model card field 'pipeline_tag' is {metadata['pipeline_tag']!r}, "
                             "expected 'image-classification'")
    if "base_model" in metadata:
        _check_hub_id(metadata["base_model"], "base_model")
    for dataset_id in metadata.get("datasets", []):
        _check_hub_id(dataset_id, "datasets")

    try:
        _, eval_results = model_index_to_eval_results(metadata["model-index"])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ModelCardError(f"model card field 'model-index' is malformed ({error!r})") from error
    for result in eval_results:
        for name in ("task_type", "dataset_type", "dataset_name", "metric_type"):
            if not isinstance(getattr(result, name), str):
                raise ModelCardError(f"model-index {name} must be a string, got {getattr(result, name)!r}")
        if not _is_number(result.metric_value):
            raise ModelCardError(f"model-index value of {result.metric_type} must be a finite number, "
                                 f"got {result.metric_value!r}")
    for example in metadata.get("widget", []):
        if not str(example.get("src", "")).startswith("https://huggingface.co/"):
            raise ModelCardError(f"widget src must be a Hub URL, got {example.get('src')!r}")

    paths = find_local_paths(readme_path.read_text(encoding="utf-8"), forbidden_paths)
    if paths:
        raise ModelCardError(f"model card {readme_path} contains local paths {paths}; they must not be published")
    return metadata


def find_local_paths(text: str, forbidden: Iterable[str | Path] = ()) -> list[str]:
    """Absolute local paths in `text` (URLs excluded), plus any of the `forbidden` strings it contains."""
    found = [match.group(0).rstrip(".,;:") for match in _LOCAL_PATH.finditer(text)]
    found += [str(path) for path in forbidden if str(path) and str(path) in text]
    return sorted(set(found))


def _check_hub_id(value: Any, field_name: str) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        try:
            validate_repo_id(item)
        except HFValidationError as error:
            raise ModelCardError(f"model card field {field_name!r} must be a Hub id, got {item!r} ({error})") from None
        if item.startswith(".") or Path(item).expanduser().exists():
            raise ModelCardError(f"model card field {field_name!r} is a local path ({item!r}), not a Hub id")


def _check_no_nulls(value: Any, where: str) -> None:
    if value is None:
        raise ModelCardError(f"model card field {where or 'metadata'!r} is null")
    if isinstance(value, float) and not math.isfinite(value):
        raise ModelCardError(f"model card field {where!r} is {value}, not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_no_nulls(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_no_nulls(item, f"{where}[{index}]")
    elif not isinstance(value, (str, int, float, bool)):
        raise ModelCardError(f"model card field {where!r} has a {type(value).__name__}, expected a plain value")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> int | None:
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    return int(value) if _is_number(value) else None


def _counts_text(counts: dict[str, Any] | None) -> str | None:
    return ", ".join(f"{name} {count}" for name, count in counts.items()) if counts else None


def _architecture_tag(backbone: str) -> str:
    """Return the architecture family's tag: `resnet18` gives `resnet`, `vit-base` gives `vit`."""
    return re.sub(r"\d+$", "", backbone.split("-")[0]) or backbone


def _architecture_text(record: RunRecord) -> str:
    if record.run_config["family"] == "vit":
        return f"a Vision Transformer (`ViTForImageClassification`, backbone `{record.run_config['backbone']}`)"
    architecture = record.model_config.get("architecture", record.run_config["backbone"])
    return f"a timm `{architecture}` CNN in `TimmWrapperForImageClassification`"


def _parameter_text(model_dir: Path) -> str:
    """Count the parameters from the safetensors headers, without loading the weights."""
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return f"{total / 1e6:.2f} M parameters" if total else "an unknown number of parameters"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelCardError(f"{path} is not valid JSON ({error}); regenerate it") from error
