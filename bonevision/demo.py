"""`bonevision demo`: the whole main job offline, on 72 bundled real radiographs, in a few minutes on a CPU."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from bonevision.run import main as run_main

DEMO_DATA = "bone-fracture-mini"

# A small from-scratch CNN at 128 px: the demo shows the pipeline end to end, it is not meant to be accurate.
DEMO_RECIPE = {
    "task": "fracture",
    "backbone": "resnet18",
    "from_scratch": "true",
    "image_size": "128",
    "num_train_epochs": "4",
    "learning_rate": "1e-3",
    "per_device_train_batch_size": "16",
    "per_device_eval_batch_size": "24",
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": "1",
    "load_best_model_at_end": "true",
    "logging_steps": "1",
    "report_to": "none",
    "dataloader_num_workers": "0",
    "n_bootstrap": "500",
    "seed": "0",
}


def demo_data_dir() -> Path:
    """Return the folder of the bundled fracture radiographs (its README.md gives source and licence)."""
    return Path(str(resources.files("bonevision") / "demo_data" / DEMO_DATA))


def run_demo(output_dir: str | None = None, extra_args: list[str] | None = None) -> Path:
    """Train and evaluate the demo model; return the path of its report."""
    if output_dir is None:
        output_dir = str(Path("bonevision-demo") / time.strftime("run-%Y%m%d-%H%M%S"))
    argv = [f"--{name}={value}" for name, value in DEMO_RECIPE.items()]
    argv += [f"--data_dir={demo_data_dir()}", f"--output_dir={output_dir}", *(extra_args or [])]
    report = run_main(argv)
    assert report is not None  # the demo runs in one process
    return report
