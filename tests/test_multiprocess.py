"""Two-process data-parallel training on CPU (gloo) with `accelerate launch`, checked against one process."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import DatasetDict
from transformers import TrainingArguments

from bonevision.evaluation import evaluate_split, load_model_folder
from bonevision.tasks import load_task_dataset
from bonevision.training import select_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_ROWS = 13  # odd, so the last evaluation batch is split unevenly and padded across the two processes
LAUNCH_TIMEOUT_SECONDS = 420


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def two_process_run(fracture_sample_dir, tmp_path_factory):
    """Launch scripts/train.py in two CPU processes; return the run folder and the combined output."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    # --cpu with --num_processes 2 would start ONE process; --multi_gpu plus the use_cpu training argument starts
    # two processes that train with DDP over gloo.
    command = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO_ROOT / "scripts" / "train.py"), "--use_cpu", "true",
        "--task", "fracture", "--backbone", "vit-tiny-test", "--from_scratch", "true",
        "--data_dir", str(fracture_sample_dir), "--output_dir", str(run_dir),
        "--dataset_cache_dir", str(run_dir.parent / "datasets-cache"),
        # The single-process check below evaluates the raw images, so the run must not use the resized cache.
        "--preprocess_cache", "false",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--report_to", "none", "--dataloader_num_workers", "0", "--n_bootstrap", "200",
        "--max_train_samples", "16", "--max_eval_samples", str(EVAL_ROWS), "--seed", "0",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_SECONDS)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return run_dir, output


def test_two_processes_ran(two_process_run):
    run_dir, _ = two_process_run

    run_config = json.loads((run_dir / "run_config.json").read_text())

    assert run_config["world_size"] == 2


def test_predictions_cover_each_row_once(two_process_run):
    run_dir, _ = two_process_run

    image_ids = [row["image_id"] for row in read_rows(run_dir / "evaluation" / "predictions.csv")]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())

    assert len(image_ids) == EVAL_ROWS
    assert len(set(image_ids)) == EVAL_ROWS
    assert metrics["num_samples"] == EVAL_ROWS


def test_main_process_writes_once(two_process_run):
    run_dir, output = two_process_run

    assert [path.name for path in run_dir.glob("**/model")] == ["model"]
    # The held-out report, and the one on validation images without a copy in train (the audit finds copies).
    reports = sorted(str(path.relative_to(run_dir)) for path in run_dir.glob("**/report.md"))
    assert reports == ["evaluation/deduplicated/report.md", "evaluation/report.md"]
    assert output.count("Saved the model") == 1
    assert output.count("Wrote report") == 2
    assert output.count("Report written to") == 1
    assert output.count("Leakage audit: 14 exact") == 1


def test_metrics_match_single_process(two_process_run, fracture_sample_dir, tmp_path):
    run_dir, _ = two_process_run
    model, image_processor, task = load_model_folder(run_dir / "model")
    dataset = load_task_dataset(task, fracture_sample_dir, cache_dir=str(run_dir.parent / "datasets-cache"))
    heldout = DatasetDict({"validation": select_rows(dataset["validation"], EVAL_ROWS, seed=0)})
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_eval_batch_size=4,
                                  report_to="none", seed=0, remove_unused_columns=False)

    evaluate_split(model, image_processor, task, heldout, "validation", tmp_path / "single", arguments,
                   n_bootstrap=200)

    distributed = json.loads((run_dir / "evaluation" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    for name in ("accuracy", "auroc", "sensitivity", "specificity", "auroc_ci_low", "auroc_ci_high"):
        assert single[name] == pytest.approx(distributed[name], abs=1e-6), name
    distributed_rows = read_rows(run_dir / "evaluation" / "predictions.csv")
    single_rows = read_rows(tmp_path / "single" / "predictions.csv")
    assert [row["image_id"] for row in single_rows] == [row["image_id"] for row in distributed_rows]
    for one, two in zip(single_rows, distributed_rows):
        assert float(one["probability_fractured"]) == pytest.approx(float(two["probability_fractured"]), abs=2e-4)
