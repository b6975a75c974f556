"""Measure the data loader: the original experiment's per-step decoding against bonevision's preprocessed cache.

Run by hand (minutes, not part of the tests):

    python benchmarks/data_pipeline.py [--data ../shared/data] [--prepare-sizes 1000 5000]

(a) the original loader opens each full-size file at every step, `ToTensor`, tensor `Resize(224)`, normalise;
(b) bonevision reads the cache through a `DataLoader` with one worker and the training preset.
Both run on the same real RSNA hand radiographs, upscaled to the original ~2000 px and half of them stored as 16-bit
PNGs, so the decoding cost is representative. Then `bonevision prepare` runs on 1,000 and 5,000 synthetic
2000 x 1500 16-bit PNGs to show that time grows linearly and peak memory stays flat.
Prints a table and ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision import transforms as T

REPO_ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_LONG_SIDE = 2000  # pixels; RSNA training radiographs are about 2000 px on the long side


def make_full_size_copies(bone_age_dir: Path, target: Path, count: int) -> list[Path]:
    """Write `count` RSNA-layout PNGs upscaled to ~2000 px; every second one as 16-bit (12-bit values)."""
    images_dir = target / "boneage-training-dataset"
    images_dir.mkdir(parents=True)
    with open(bone_age_dir / "boneage-training-dataset.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:count]

    paths = []
    for index, row in enumerate(rows):
        image = Image.open(bone_age_dir / "boneage-training-dataset" / f"{row['id']}.png").convert("L")
        scale = ORIGINAL_LONG_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        if index % 2:
            pixels = np.asarray(image, dtype=np.uint16) * 16  # 12-bit values in 16-bit storage
            image = Image.fromarray(pixels)
        path = images_dir / f"{row['id']}.png"
        image.save(path)
        paths.append(path)

    with open(target / "boneage-training-dataset.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "boneage", "male"])
        writer.writeheader()
        writer.writerows(rows)
    return paths


def time_original_loader(paths: list[Path], passes: int) -> float:
    """Images/s of the original experiment's loader in one process."""
    transform = T.Compose([T.ToTensor(), T.Resize((224, 224), antialias=True), T.Normalize([0.5] * 3, [0.5] * 3)])
    start = time.perf_counter()
    for _ in range(passes):
        for path in paths:
            with Image.open(path) as image:
                transform(image.convert("RGB"))
    return passes * len(paths) / (time.perf_counter() - start)


def time_cached_loader(data_dir: Path, cache_dir: Path, image_format: str, passes: int) -> tuple[float, float]:
    """Images/s of bonevision's cached training loader with one DataLoader worker (one core), and bytes per image."""
    import datasets

    from bonevision.cache import CacheSettings, prepare_cache
    from bonevision.models import build_image_processor, get_backbone
    from bonevision.tasks import get_task, load_task_dataset
    from bonevision.presets import train_preset_for
    from bonevision.transforms import collate_tensors, make_batch_transform

    task = get_task("bone-age")
    dataset = load_task_dataset(task, data_dir, cache_dir=str(cache_dir), validation_fraction=0.1)
    cached = prepare_cache(dataset, CacheSettings(shorter_side=256, image_format=image_format))["train"]
    cache_bytes_per_image = sum(os.path.getsize(entry["filename"]) for entry in cached.cache_files) / len(cached)

    rows = cached.cast_column("image", datasets.Image(decode=False))
    preset = train_preset_for(build_image_processor(get_backbone("vit-base")))
    rows.set_transform(make_batch_transform(task, preset, target_mean=120.0, target_std=40.0, shorter_side=256))
    loader = torch.utils.data.DataLoader(rows, batch_size=32, num_workers=1, collate_fn=collate_tensors,
                                         persistent_workers=True, shuffle=True)
    for _ in loader:  # warm-up: worker start, first file reads
        break
    images = 0
    start = time.perf_counter()
    for _ in range(passes):
        for batch in loader:
            images += len(batch["pixel_values"])
    return images / (time.perf_counter() - start), cache_bytes_per_image


def make_synthetic_16bit(target: Path, count: int, distinct: int = 16) -> None:
    """Write an RSNA-layout folder of `count` 2000 x 1500 16-bit PNGs (hard links to `distinct` different images)."""
    images_dir = target / "boneage-training-dataset"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:1500, 0:2000]
    originals = []
    for index in range(distinct):
        smooth = 1500 + 1000 * np.sin(x / (97 + index)) * np.cos(y / (131 + 3 * index))
        pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 4095).astype(np.uint16)
        path = target / f"original-{index}.png"
        Image.fromarray(pixels).save(path)
        originals.append(path)

    with open(target / "boneage-training-dataset.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "boneage", "male"])
        for image_id in range(1, count + 1):
            os.link(originals[image_id % distinct], images_dir / f"{image_id}.png")
            writer.writerow([image_id, 12 + image_id % 200, image_id % 2 == 0])


def run_prepare_measured(data_dir: Path, cache_dir: Path, num_proc: int) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (MiB, summed over the process tree) of `bonevision prepare`."""
    command = [sys.executable, "-m", "bonevision.cli", "prepare", "rsna-bone-age", str(data_dir),
               "--cache-dir", str(cache_dir), "--num-proc", str(num_proc)]
    # stderr (progress bars, logs) goes to a file, because an unread pipe fills up and blocks the child process.
    stderr_log = tempfile.TemporaryFile()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_log)
    peak = 0
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(member.memory_info().rss for member in tree))
        except psutil.Error:
            pass
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    if process.returncode != 0:
        stderr_log.seek(0)
        raise RuntimeError(f"bonevision prepare failed: {stderr_log.read().decode()[-2000:]}")
    return elapsed, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=48, help="Real radiographs in the loader comparison.")
    parser.add_argument("--prepare-sizes", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--num-proc", type=int, default=2, help="Processes for prepare.")
    args = parser.parse_args()

    torch.set_num_threads(1)  # per-core figures: one thread in the measuring process (OpenCV: see presets)
    figures: dict[str, float | str] = {"machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{os.cpu_count()} cores"}
    work = Path(tempfile.mkdtemp(prefix="bonevision-bench-"))
    try:
        real = work / "real"
        paths = make_full_size_copies(args.data / "rsna-bone-age-sample", real, args.images)
        figures["seed_loader_img_per_s_per_core"] = time_original_loader(paths, passes=1)
        for image_format in ("png", "jpeg"):
            rate, size = time_cached_loader(real, work / f"cache-{image_format}", image_format, passes=6)
            figures[f"cached_loader_{image_format}_img_per_s_per_core"] = rate
            figures[f"cache_{image_format}_kib_per_image"] = size / 1024
        # bonevision's default cache format is JPEG (quality 95).
        figures["cached_loader_img_per_s_per_core"] = figures["cached_loader_jpeg_img_per_s_per_core"]
        figures["speedup"] = figures["cached_loader_img_per_s_per_core"] / figures["seed_loader_img_per_s_per_core"]

        for count in args.prepare_sizes:
            folder = work / f"synthetic-{count}"
            make_synthetic_16bit(folder, count)
            elapsed, peak = run_prepare_measured(folder, work / f"prepare-cache-{count}", args.num_proc)
            figures[f"prepare_{count}_s"] = elapsed
            figures[f"prepare_{count}_peak_rss_mib"] = peak
            shutil.rmtree(folder)
            shutil.rmtree(work / f"prepare-cache-{count}")
        if len(args.prepare_sizes) == 2:
            small, large = args.prepare_sizes
            figures["prepare_rss_ratio"] = figures[f"prepare_{large}_peak_rss_mib"] / figures[f"prepare_{small}_peak_rss_mib"]
            figures["prepare_time_ratio"] = figures[f"prepare_{large}_s"] / figures[f"prepare_{small}_s"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'figure':<45} {'value':>12}")
    for name, value in figures.items():
        formatted = f"{value:12.1f}" if isinstance(value, float) else f"{value:>12}"
        print(f"{name:<45} {formatted}")
    print(json.dumps({name: round(value, 2) if isinstance(value, float) else value
                      for name, value in figures.items()}))


if __name__ == "__main__":
    main()
