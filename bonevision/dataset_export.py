"""Export a builder's DatasetDict as a script-free Hub dataset: Parquet shards plus a dataset card.

The layout is the one `DatasetDict.push_to_hub` writes (`data/<split>-00000-of-00001.parquet` and a README.md
whose YAML has `configs:` and `dataset_info:`), so `load_dataset("USER/NAME")` loads it with no loading script
and keeps the features (ClassLabel names, Image, float32, bool). Images are embedded as bytes, because the
builders store only the path of each file for folder downloads.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
from datasets.info import DatasetInfo, DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.table import embed_table_storage
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard

from bonevision.hub import UPLOAD_ATTEMPTS, call_with_retries

logger = logging.getLogger(__name__)

DATA_DIR = "data"
MAX_SHARD_BYTES = 500 * 1000 * 1000  # the default shard size of `push_to_hub` (datasets.config.MAX_SHARD_SIZE)
PUSH_ADVICE = "nothing local was changed, rerun the dataset push"

EXPORT_NOTE = """\
This repository holds the data as Parquet files (images embedded as bytes), so it loads with no script:

```python
from datasets import load_dataset

dataset = load_dataset("{repo_id}")
```

The rest of this card describes the data and the bonevision builder that read the original download.
"""


def export_dataset(dataset_dict: datasets.DatasetDict, output_dir: str | Path, *, card_path: str | Path,
                   repo_id: str = "USER/NAME", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write every split as Parquet under `output_dir/data/` and the dataset card as `output_dir/README.md`.

    `card_path` is the builder's dataset card (e.g. `hf_datasets/bone_fracture/README.md`); its text is kept
    and its YAML gains `configs` and a complete `dataset_info`. `repo_id` only appears in the loading example.
    Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    if (output_dir / DATA_DIR).exists():
        raise FileExistsError(f"{output_dir / DATA_DIR} already exists; choose an empty output folder")
    (output_dir / DATA_DIR).mkdir(parents=True)

    split_infos = []
    for split, dataset in dataset_dict.items():
        num_bytes = write_split(dataset, output_dir / DATA_DIR, split, max_shard_bytes=max_shard_bytes)
        split_infos.append(SplitInfo(name=split, num_examples=len(dataset), num_bytes=num_bytes))
        logger.info("Wrote split %s: %d rows, %.1f MB with images embedded", split, len(dataset), num_bytes / 1e6)

    card = dataset_card(dataset_dict, split_infos, card_path=card_path, repo_id=repo_id)
    card.save(output_dir / "README.md")
    return output_dir


def write_split(dataset: datasets.Dataset, data_dir: Path, split: str, *, max_shard_bytes: int) -> int:
    """Write one split as `<split>-NNNNN-of-MMMMM.parquet` shards; return its Arrow size with images embedded.

    The number of shards comes from the estimated size with images embedded (the image files' sizes plus the
    other columns), aiming like `push_to_hub` at shards of at most `max_shard_bytes`, and at least one row each.
    """
    num_shards = max(1, min(len(dataset), math.ceil(_estimated_bytes(dataset) / max_shard_bytes)))
    total = 0
    for index in range(num_shards):
        shard = dataset.shard(num_shards=num_shards, index=index, contiguous=True)
        # embed_table_storage reads each image file into the table, keeping only its base name as path.
        embedded = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
        path = data_dir / f"{split}-{index:05d}-of-{num_shards:05d}.parquet"
        embedded.with_format(None).to_parquet(str(path))
        total += embedded.data.nbytes
    return total


def dataset_card(dataset_dict: datasets.DatasetDict, split_infos: list[SplitInfo], *, card_path: str | Path,
                 repo_id: str) -> DatasetCard:
    """Add `configs` (data files per split) and a full `dataset_info` (features, splits) to the builder's card."""
    card_path = Path(card_path)
    if not card_path.is_file():
        raise FileNotFoundError(f"dataset card {card_path} not found; pass the builder's README.md")
    card = DatasetCard.load(card_path)
    first = next(iter(dataset_dict.values()))
    info = DatasetInfo(features=first.features, splits=SplitDict({split.name: split for split in split_infos}),
                       dataset_size=sum(split.num_bytes for split in split_infos))
    card.data.dataset_info = None  # replaced as a whole below (the builder card lists features only)
    DatasetInfosDict({"default": info}).to_dataset_card_data(card.data)
    data_files = [{"split": split.name, "path": f"{DATA_DIR}/{split.name}-*"} for split in split_infos]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(card.data)
    body = card.text.lstrip("\n")
    return DatasetCard(f"---\n{card.data.to_yaml()}\n---\n\n" + EXPORT_NOTE.format(repo_id=repo_id) + "\n" + body)


def push_dataset(dataset_dict: datasets.DatasetDict, repo_id: str, *, card_path: str | Path, private: bool,
                 api: Any = None, sleep: Callable[[float], None] = time.sleep,
                 attempts: int = UPLOAD_ATTEMPTS) -> str:
    """Export `dataset_dict` to a temporary folder and upload it as the dataset repository `repo_id`.

    Uses the same retry policy as model pushes; the token comes from huggingface_hub's own lookup. Returns
    the dataset URL.
    """
    card_licence = DatasetCard.load(Path(card_path)).data.license
    if card_licence == "other" and not private:
        logger.warning("The dataset card's licence is 'other' (%s); check that its terms allow publishing the "
                       "images before making %s public", card_path, repo_id)
    with tempfile.TemporaryDirectory(prefix="bonevision-dataset-") as staging:
        folder = export_dataset(dataset_dict, Path(staging) / "export", card_path=card_path, repo_id=repo_id)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        call_with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="dataset"),
                          f"creating dataset {repo_id}", attempts=attempts, sleep=sleep, advice=PUSH_ADVICE)
        call_with_retries(lambda: api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset",
                                                    commit_message="Upload Parquet export from bonevision"),
                          f"upload to dataset {repo_id}", attempts=attempts, sleep=sleep, advice=PUSH_ADVICE)
    url = f"https://huggingface.co/datasets/{repo_id}"
    logger.info("Uploaded %s", url)
    return url


def _estimated_bytes(dataset: datasets.Dataset) -> int:
    """Estimate the size with images embedded: the Arrow rows plus the image files stored only by path."""
    table = dataset.with_format("arrow")[:]  # the selected rows, without decoding any image
    total = table.nbytes
    for name, feature in dataset.features.items():
        if not isinstance(feature, datasets.Image):
            continue
        cells = table.column(name).combine_chunks()
        for path, stored in zip(cells.field("path").to_pylist(), cells.field("bytes").is_valid().to_pylist()):
            if not stored and path and os.path.isfile(path):
                total += os.path.getsize(path)
    return total

