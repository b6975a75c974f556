"""Select and downsize the bundled demo radiographs from a local copy of the fracture sample.

Run once by a maintainer: `python tools/make_demo_data.py ../shared/data/bone-fracture-sample`. Files that take part
in any exact or near-duplicate pair (DUPLICATES.csv), truncated files and rotated variants of a base image that
already appears in another split are skipped, so the demo's validation images have no copy in its training images.
"""

import csv
import re
import sys
from pathlib import Path

from PIL import Image

TARGET = Path(__file__).resolve().parents[1] / "bonevision" / "demo_data" / "bone-fracture-mini"
PER_CLASS = {"train": 24, "val": 12}
MAX_SIDE = 256  # pixels; keeps the bundle well under 5 MB


def main(sample_dir: Path) -> None:
    duplicates = set()
    with open(sample_dir / "DUPLICATES.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            duplicates.update({row["val_file"], row["train_file"]})
    provenance = {}
    with open(sample_dir / "PROVENANCE.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            provenance[row["file"]] = row

    used_bases: dict[str, str] = {}  # (class, base number) -> split
    rows = []
    for split in ("train", "val"):
        for label in ("fractured", "not fractured"):
            chosen = 0
            for path in sorted((sample_dir / split / label).iterdir()):
                relative = f"{split}/{label}/{path.name}"
                info = provenance[relative]
                if relative in duplicates or info["opens"] != "yes" or info["format"] not in {"JPEG", "PNG"}:
                    continue
                base = re.match(r"^(\d+)-rotated", path.name)
                key = f"{label}/{base.group(1)}" if base else None
                if key and used_bases.setdefault(key, split) != split:
                    continue
                if chosen == PER_CLASS[split]:
                    break
                image = Image.open(path)
                image.load()
                image = image.convert("L") if image.mode != "L" else image
                image.thumbnail((MAX_SIDE, MAX_SIDE))
                out = TARGET / split / label / (path.stem + ".jpg")
                out.parent.mkdir(parents=True, exist_ok=True)
                image.save(out, quality=90)
                rows.append({"file": f"{split}/{label}/{out.name}", "source_file": relative,
                             "source_repo": info["repo"], "source_path": info["source_path"],
                             "commit": info["commit"], "label": label, "original_size": f"{info['w']}x{info['h']}"})
                chosen += 1
    with open(TARGET / "PROVENANCE.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} images to {TARGET}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
