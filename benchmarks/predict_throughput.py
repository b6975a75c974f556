"""Compare the throughput of `bonevision.prediction.predict_files` with a loop over `transformers.pipeline`.

Run by hand (not a test), offline:

    .venv/bin/python benchmarks/predict_throughput.py [IMAGES] [--backbones vit-tiny-test resnet18]
        [--image-size 128] [--batch-size 32] [--num-workers 2]

For each backbone, a model with random weights is built from the registry at `--image-size` pixels and saved to a
temporary folder. Both sides then classify the same files (default: the real fracture sample under
../shared/data/bone-fracture-sample, which includes two truncated JPEGs):

* predict: one `predict_files` call, timed from model loading to the last batch.
* pipeline loop: `pipeline("image-classification", model=folder)` called once per file, timed from the first call
  to the last; building the pipeline is not timed. Files the pipeline cannot read are caught and counted.

The script prints a table and ends with one JSON line: images per second of each side over all backbones together,
and their ratio as `speedup`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bonevision.decoding import sniff_image_format
from bonevision.models import build_image_processor, build_model, get_backbone
from bonevision.prediction import collect_files, predict_files

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "bone-fracture-sample"
ID2LABEL = {0: "fractured", 1: "not fractured"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", type=Path, default=DEFAULT_IMAGES,
                        help="Folder of images (searched recursively) or a single file.")
    parser.add_argument("--backbones", nargs="+", default=["vit-tiny-test", "resnet18"],
                        help="Registry names of the backbones to build with random weights.")
    parser.add_argument("--image-size", type=int, default=128, help="Model input size in pixels.")
    parser.add_argument("--batch-size", type=int, default=32, help="predict_files batch size.")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="predict_files DataLoader workers (default: up to 4, at most the CPU count).")
    return parser.parse_args(argv)


def save_random_model(backbone_name: str, image_size: int, folder: Path) -> Path:
    """Build a from-scratch fracture classifier for `backbone_name` and save it as a model folder."""
    backbone = get_backbone(backbone_name)
    model = build_model(backbone, num_labels=len(ID2LABEL), id2label=ID2LABEL,
                        problem_type="single_label_classification", from_scratch=True, image_size=image_size,
                        extra_config={"bonevision_task": "fracture"})
    model_dir = folder / backbone_name
    model.save_pretrained(model_dir)
    build_image_processor(backbone, image_size=image_size).save_pretrained(model_dir)
    return model_dir


def time_predict(model_dir: Path, files: list[str], batch_size: int, num_workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    result = predict_files(model_dir, files, batch_size=batch_size, num_workers=num_workers)
    return time.perf_counter() - start, len(result.rows)


def time_pipeline_loop(model_dir: Path, files: list[str]) -> tuple[float, int]:
    from transformers import pipeline

    device = 0 if torch.cuda.is_available() else -1
    classifier = pipeline("image-classification", model=str(model_dir), device=device)
    # Warm-up on the first image, because the first call of a pipeline is slower than the rest.
    classifier(next(path for path in files if sniff_image_format(path) is not None))

    predicted = 0
    start = time.perf_counter()
    for path in files:
        try:
            classifier(path)
        except (OSError, ValueError):  # a CSV file or a truncated JPEG; predict_files skips the same files
            continue
        predicted += 1
    return time.perf_counter() - start, predicted


def warm_file_cache(files: list[str]) -> None:
    """Read every file once so that neither side pays for cold disk reads."""
    for path in files:
        with open(path, "rb") as file:
            file.read()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    files = collect_files([args.images])
    if not files:
        print(f"no files found under {args.images}", file=sys.stderr)
        return 1
    warm_file_cache(files)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(files)} files from {args.images}; device {device}, {os.cpu_count()} CPUs, "
          f"batch size {args.batch_size}, {args.num_workers} workers, {args.image_size} px")

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for backbone_name in args.backbones:
            model_dir = save_random_model(backbone_name, args.image_size, Path(folder))
            predict_seconds, predict_images = time_predict(model_dir, files, args.batch_size, args.num_workers)
            loop_seconds, loop_images = time_pipeline_loop(model_dir, files)
            rows.append((backbone_name, predict_images, predict_seconds, loop_images, loop_seconds))

    print(f"{'backbone':<16} {'images':>7} {'predict s':>10} {'img/s':>8} {'loop s':>8} {'img/s':>8} {'speedup':>8}")
    for name, predict_images, predict_seconds, loop_images, loop_seconds in rows:
        predict_rate, loop_rate = predict_images / predict_seconds, loop_images / loop_seconds
        print(f"{name:<16} {predict_images:>7} {predict_seconds:>10.2f} {predict_rate:>8.1f} "
              f"{loop_seconds:>8.2f} {loop_rate:>8.1f} {predict_rate / loop_rate:>8.2f}")

    predict_rate = sum(row[1] for row in rows) / sum(row[2] for row in rows)
    loop_rate = sum(row[3] for row in rows) / sum(row[4] for row in rows)
    print(json.dumps({"predict_img_per_s": round(predict_rate, 2), "pipeline_loop_img_per_s": round(loop_rate, 2),
                      "speedup": round(predict_rate / loop_rate, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
