"""`bonevision push`: upload a run's model, its model card, example images and evaluation to the Hub.

The upload folder is assembled in a temporary directory, so the run folder is only ever read. The card is
validated offline before any API call, and uploads go through `HfApi.upload_folder` (HTTP, no git). The token
is never handled here: `HfApi` finds it itself (`HF_TOKEN` or the `hf auth login` file).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonevision.model_card import (
    DATASET_LICENCES,
    CardExample,
    ModelCardError,
    RunRecord,
    find_local_paths,
    load_run_record,
    render_model_card,
    validate_model_card,
)

logger = logging.getLogger(__name__)

EVALUATION_FILES = ("metrics.json", "report.md")
RUN_FILES = ("run_config.json", "data_report.json", "audit/audit.json")
MAX_EXAMPLE_SIDE = 512  # pixels, the longer side of an uploaded example image
UPLOAD_ATTEMPTS = 3
FIRST_RETRY_DELAY_S = 2.0  # doubled after each failed attempt

PUSH_ADVICE = "the run folder is unchanged, rerun bonevision push"

RSNA_LICENCE_NOTICE = """\
# Licence: RSNA Pediatric Bone Age Challenge terms

These weights were trained on radiographs of the RSNA Pediatric Bone Age Machine Learning Challenge 2017
(Kaggle copy `kmader/rsna-bone-age`). RSNA and the Stanford AIMI Center release those data for research,
non-commercial use with attribution.

The weights are shared under the same terms: use them for non-commercial research only, cite Halabi et al.,
"The RSNA Pediatric Bone Age Machine Learning Challenge", Radiology 2019;290(2):498-503, and read the RSNA and
Stanford AIMI terms of use before any other use. This notice summarises those terms and does not replace them.
"""


class HubUploadError(RuntimeError):
    """An upload that failed; the run folder is unchanged and the push can simply be rerun."""


@dataclass
class PushResult:
    """Record of a push: the files uploaded (or, for a dry run, the files it would upload) and the card."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in the repository, size in bytes)
    card_text: str
    dry_run: bool
    url: str | None = None
    examples: list[CardExample] = field(default_factory=list)


def push_run(run_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False, api: Any = None,
             dataset_id: str | None = None, examples_from: str | Path | None = None,
             dataset_cache_dir: str | Path | None = None, sleep: Callable[[float], None] = time.sleep,
             attempts: int = UPLOAD_ATTEMPTS) -> PushResult:
    """Upload the run at `run_dir` to the model repository `repo_id`.

    `examples_from` is the data folder the run was evaluated on; 3 evaluation images are taken from it for the
    card's widget, read through the dataset builder with `dataset_cache_dir` (default: the `datasets` cache,
    which reuses the Arrow files prepared for training). `dry_run` builds and validates everything but makes no
    API call. Network errors are retried `attempts` times with exponential backoff through `sleep`, then raise
    HubUploadError. The upload folder is a temporary copy, so the run folder is never modified.
    """
    record = load_run_record(run_dir)
    with tempfile.TemporaryDirectory(prefix="bonevision-push-") as staging:
        upload_dir = Path(staging) / repo_id.replace("/", "--")
        examples = stage_upload_folder(record, upload_dir, repo_id, dataset_id=dataset_id,
                                       examples_from=examples_from, cache_dir=dataset_cache_dir)
        files = [(path.relative_to(upload_dir).as_posix(), path.stat().st_size)
                 for path in sorted(upload_dir.rglob("*")) if path.is_file()]
        result = PushResult(repo_id=repo_id, files=files, card_text=(upload_dir / "README.md").read_text("utf-8"),
                            dry_run=dry_run, examples=examples)
        if dry_run:
            logger.info("Dry run: %d files (%.1f MB) would be uploaded to %s", len(files),
                        sum(size for _, size in files) / 1e6, repo_id)
            return result

        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        logger.info("Uploading %d files (%.1f MB) to %s", len(files), sum(size for _, size in files) / 1e6, repo_id)
        call_with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                          f"creating {repo_id}", attempts=attempts, sleep=sleep)
        call_with_retries(lambda: api.upload_folder(repo_id=repo_id, folder_path=str(upload_dir), repo_type="model",
                                                    commit_message=f"Upload bonevision {record.task} model"),
                          f"upload to {repo_id}", attempts=attempts, sleep=sleep)
    result.url = f"https://huggingface.co/{repo_id}"
    logger.info("Uploaded %s", result.url)
    return result


def stage_upload_folder(record: RunRecord, upload_dir: Path, repo_id: str, *, dataset_id: str | None = None,
                        examples_from: str | Path | None = None,
                        cache_dir: str | Path | None = None) -> list[CardExample]:
    """Copy the model, run and evaluation files into `upload_dir`, add examples and the validated README.md."""
    upload_dir.mkdir(parents=True)
    run_dir = record.run_dir
    for path in sorted((run_dir / "model").iterdir()):  # save_pretrained output, shards and index included
        if path.is_file():
            shutil.copy2(path, upload_dir / path.name)
    for relative in RUN_FILES:
        if (run_dir / relative).is_file():
            (upload_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run_dir / relative, upload_dir / relative)

    redistributable = DATASET_LICENCES[record.dataset]["redistributable"]
    evaluation = run_dir / "evaluation"
    names = list(EVALUATION_FILES) + sorted(path.name for path in evaluation.glob("*.png"))
    if redistributable:
        names.append("predictions.csv")  # image ids are relative to the data root, and labels may be shared
    (upload_dir / "evaluation").mkdir()
    for name in names:
        if (evaluation / name).is_file():
            shutil.copy2(evaluation / name, upload_dir / "evaluation" / name)
    if record.dataset == "rsna-bone-age":
        (upload_dir / "LICENSE.md").write_text(RSNA_LICENCE_NOTICE, encoding="utf-8")

    examples: list[CardExample] = []
    if examples_from is not None and not redistributable:
        logger.warning("Not uploading example images: the %s licence does not clearly allow redistributing its "
                       "images, so the card has no widget examples", record.dataset)
    elif examples_from is not None:
        examples = write_examples(record, examples_from, upload_dir / "examples", cache_dir=cache_dir)

    card = render_model_card(record, repo_id, dataset_id=dataset_id, examples=examples)
    card.save(upload_dir / "README.md")
    forbidden = [str(run_dir.resolve())]
    if len(Path.home().parts) > 1:  # a home of "/" would match every path separator
        forbidden.append(str(Path.home()))
    if examples_from is not None:
        forbidden.append(str(Path(examples_from).resolve()))
    validate_model_card(upload_dir / "README.md", forbidden_paths=forbidden)
    check_no_local_paths(upload_dir, forbidden)
    return examples


def check_no_local_paths(upload_dir: Path, forbidden: list[str]) -> None:
    """Raise ModelCardError when a text file to upload contains an absolute local path."""
    for path in sorted(upload_dir.rglob("*")):
        if path.suffix not in {".json", ".md", ".csv", ".txt"}:
            continue
        found = find_local_paths(path.read_text(encoding="utf-8", errors="replace"), forbidden)
        if found:
            raise ModelCardError(f"{path.relative_to(upload_dir)} contains local paths {found}; "
                                 "remove them from the run folder's file before pushing")


def write_examples(record: RunRecord, data_dir: str | Path, examples_dir: Path, *, count: int = 3,
                   cache_dir: str | Path | None = None) -> list[CardExample]:
    """Save `count` evaluation images (longer side <= 512 px, PNG) and record the model's pipeline output on each.

    The images are chosen from evaluation/predictions.csv: one per class in turn for classification, the
    youngest, median and oldest reference ages for bone age. They are read from `data_dir` with the dataset
    builder, bonevision's decoding rule and the model's `preprocessing_shorter_side` downscaling, as evaluation
    read them.
    """
    import datasets
    from PIL import Image
    from transformers import pipeline

    from bonevision.tasks import get_task, load_task_dataset
    from bonevision.transforms import decode_image_cell

    split = str(record.metrics.get("split", "validation"))
    chosen = choose_example_rows(record, count)
    task = get_task(record.task)
    seed = int(record.run_config.get("training_arguments", {}).get("seed", 42))
    # A seeded bone age validation split is rebuilt with the run's own fraction and seed.
    validation_fraction = float(record.run_config.get("validation_fraction", 0.1))
    dataset = load_task_dataset(task, data_dir, seed=seed, validation_fraction=validation_fraction,
                                cache_dir=str(cache_dir) if cache_dir else None)
    if split not in dataset:
        raise ValueError(f"{data_dir} has no {split!r} split; pass the data folder the run was evaluated on")
    rows = dataset[split].cast_column("image", datasets.Image(decode=False))
    index_by_id = {image_id: index for index, image_id in enumerate(rows["image_id"])}
    missing = [row["image_id"] for row in chosen if row["image_id"] not in index_by_id]
    if missing:
        raise ValueError(f"evaluation images {missing} not found in the {split!r} split of {data_dir}; "
                         "pass the data folder the run was evaluated on")

    is_regression = record.task == "bone-age"
    shorter_side = record.model_config.get("preprocessing_shorter_side")  # evaluation's downscaling, if any
    classifier = pipeline("image-classification", model=str(record.run_dir / "model"),
                          function_to_apply="none" if is_regression else None)
    examples_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    for number, row in enumerate(chosen, start=1):
        cell = rows[index_by_id[row["image_id"]]]["image"]
        image = decode_image_cell(cell, shorter_side)
        image.thumbnail((MAX_EXAMPLE_SIDE, MAX_EXAMPLE_SIDE))
        reference = (f"{float(row['bone_age_months']):.0f} months" if is_regression else row["label"])
        file_name = f"example-{number}-{_slug(reference)}.png"
        image.save(examples_dir / file_name, format="PNG")
        with Image.open(examples_dir / file_name) as saved:  # what the widget sends: the uploaded PNG
            outputs = classifier(saved)
        outputs = [{"label": item["label"], "score": round(float(item["score"]), 4)} for item in outputs]
        title = f"Reference: {reference}"
        examples.append(CardExample(file_name=file_name, title=title, reference=reference, outputs=outputs))
    logger.info("Wrote %d example images to %s", len(examples), examples_dir)
    return examples


def choose_example_rows(record: RunRecord, count: int) -> list[dict[str, str]]:
    """Pick evaluation rows deterministically from predictions.csv (sorted by image id)."""
    path = record.run_dir / "evaluation" / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; it lists the evaluation images the examples are taken from")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["image_id"])
    if not rows:
        raise ValueError(f"{path} has no rows")
    if record.task == "bone-age":
        by_age = sorted(rows, key=lambda row: float(row["bone_age_months"]))
        positions = sorted({round(step * (len(by_age) - 1) / max(count - 1, 1)) for step in range(count)})
        return [by_age[position] for position in positions]
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    chosen: list[dict[str, str]] = []
    while len(chosen) < min(count, len(rows)):
        for label in sorted(by_label):
            if by_label[label] and len(chosen) < count:
                chosen.append(by_label[label].pop(0))
    return chosen


def call_with_retries(action: Callable[[], Any], description: str, *, attempts: int = UPLOAD_ATTEMPTS,
                      sleep: Callable[[float], None] = time.sleep, advice: str = PUSH_ADVICE) -> Any:
    """Run `action`, retrying network failures (connection errors, timeouts, HTTP 429 and 5xx) with backoff.

    Waits 2 s, then 4 s, ... between attempts. Other HTTP errors (401, 403, 404, ...) and the last network
    error raise HubUploadError, whose message ends with `advice` (what is unchanged, what to rerun). Any other
    exception propagates unchanged.
    """
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as error:
            if not is_retryable(error):
                if not isinstance(error, HfHubHTTPError):
                    raise
                raise HubUploadError(f"{description} failed: {_describe(error)}. Check the repository id and your "
                                     f"login (`hf auth login` or HF_TOKEN); {advice}") from error
            if attempt == attempts:
                raise HubUploadError(f"{description} failed after {attempts} attempts: {_describe(error)}; "
                                     f"{advice}") from error
            delay = FIRST_RETRY_DELAY_S * 2 ** (attempt - 1)
            logger.warning("%s failed (attempt %d of %d): %s; retrying in %.0f s", description, attempt, attempts,
                           _describe(error), delay)
            sleep(delay)
    raise AssertionError("unreachable")


def is_retryable(error: BaseException) -> bool:
    """Return True for transient network failures: connection errors, timeouts, HTTP 429 and 5xx."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is None or status == 429 or status >= 500
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    # huggingface_hub 2.x sends requests with httpx2, 1.x with httpx and 0.x with requests.
    network_errors: list[type[BaseException]] = []
    for module_name, names in (("httpx2", ["TransportError"]), ("httpx", ["TransportError"]),
                               ("requests", ["ConnectionError", "Timeout"])):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        network_errors += [getattr(module, name) for name in names]
    return isinstance(error, tuple(network_errors))


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `bonevision push` options to `parser`."""
    parser.add_argument("run_dir", type=Path, help="A bonevision run folder (with model/, evaluation/ and "
                                                    "run_config.json). It is only read.")
    parser.add_argument("--repo-id", "--repo_id", required=True, help="Model repository, as USER/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="List the files and print the model card without contacting the Hub.")
    parser.add_argument("--dataset-id", "--dataset_id", default=None,
                        help="Hub id of the training data (USER/NAME) to list in the card; local folders are never "
                             "listed.")
    parser.add_argument("--examples-from", "--examples_from", default=None,
                        help="The data folder (or .zip) the run was evaluated on; 3 evaluation images from it "
                             "become the card's widget examples. Without it the card has no examples.")
    return parser


def run_push_command(args: argparse.Namespace) -> PushResult:
    """Run `bonevision push` from parsed arguments; a dry run prints the file list and the card."""
    result = push_run(args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run,
                      dataset_id=args.dataset_id, examples_from=args.examples_from)
    if result.dry_run:
        print(f"Would upload {len(result.files)} files to {result.repo_id}:")
        for path, size in result.files:
            print(f"  {path}  ({size:,} bytes)")
        print()
        print(result.card_text)
    else:
        print(f"Uploaded {len(result.files)} files to {result.url}")
    return result


def _describe(error: BaseException) -> str:
    """`Type: message` with the current Hub token masked, in case a server echoed it."""
    from huggingface_hub import get_token

    text = f"{type(error).__name__}: {error}"
    token = get_token()
    return text.replace(token, "***") if token else text


def _slug(text: str) -> str:
    return "-".join("".join(char if char.isalnum() else " " for char in text.lower()).split())
