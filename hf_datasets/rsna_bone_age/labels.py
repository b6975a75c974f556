"""Reading the RSNA bone age label CSVs and drawing the seeded, stratified validation split.

The RSNA training, validation and test CSVs name their columns differently (`id,boneage,male`,
`Image ID,male,Bone Age (months)`, `Case ID,Sex`), and `read_label_csv` accepts all of them.
"""

from __future__ import annotations

import csv
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Column names seen in the RSNA CSVs, lower-cased. The first one present in a file is used.
ID_COLUMNS = ("id", "image id", "case id")
AGE_COLUMNS = ("boneage", "bone age (months)", "bone age")
MALE_VALUES = {"true": True, "1": True, "false": False, "0": False}  # column "male"
SEX_VALUES = {"m": True, "male": True, "f": False, "female": False}  # column "sex"

AGE_BAND_MONTHS = 50  # stratification bands for the seeded validation split: 0-49, 50-99, ... 200+
NUM_AGE_BANDS = 5


@dataclass(frozen=True)
class LabelRow:
    """One CSV row, with `bone_age_months` None in the unlabelled test CSV and `line` counted from the header (1)."""

    image_id: str
    bone_age_months: float | None
    male: bool
    line: int


def _find_column(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [column.strip().lower() for column in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _parse_age(value: str, where: str) -> float:
    if not value:
        raise ValueError(f"{where}: missing bone age. Fill it in or remove the row.")
    try:
        age = float(value)
    except ValueError:
        raise ValueError(f"{where}: bone age {value!r} is not a number of months. Fix or remove the row.") from None
    if not math.isfinite(age):
        raise ValueError(f"{where}: bone age {value!r} is not a finite number of months. Fix or remove the row.")
    if age < 0:
        raise ValueError(f"{where}: bone age {value!r} is negative. Fix or remove the row.")
    return age


def read_label_csv(csv_path: Path, *, require_age: bool) -> tuple[dict[str, LabelRow], int]:
    """Read an RSNA label CSV in any of its known column variants, returning rows by id and the duplicate count.

    A duplicate id with identical labels is kept once and counted.

    Raises:
        ValueError: naming the file and line for a missing column, a repeated header row, a missing,
            non-numeric or negative age, an unknown sex value, or a duplicate id with other labels.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{csv_path} is empty. Expected a header such as 'id,boneage,male'.")
        id_column = _find_column(header, ID_COLUMNS)
        age_column = _find_column(header, AGE_COLUMNS)
        sex_column = _find_column(header, ("male", "sex"))
        if id_column is None or sex_column is None or (require_age and age_column is None):
            raise ValueError(
                f"{csv_path}: missing column in header {header}. Expected an id column (one of {ID_COLUMNS}), "
                "a sex column ('male' or 'Sex')"
                + (f" and an age column (one of {AGE_COLUMNS})" if require_age else "")
                + ", in any case."
            )
        sex_values = MALE_VALUES if header[sex_column].strip().lower() == "male" else SEX_VALUES
        normalised_header = [column.strip().lower() for column in header]

        rows: dict[str, LabelRow] = {}
        duplicates = 0
        for values in reader:
            where = f"{csv_path}: row {reader.line_num}"
            values = [value.strip() for value in values]
            if not any(values):
                continue
            if [value.lower() for value in values] == normalised_header:
                raise ValueError(
                    f"{where}: repeated header row, as when CSV files are concatenated with their headers. Remove it."
                )
            values += [""] * (len(header) - len(values))

            image_id = values[id_column]
            if not image_id:
                raise ValueError(f"{where}: missing id. Fill it in or remove the row.")
            sex = values[sex_column].lower()
            if sex not in sex_values:
                raise ValueError(
                    f"{where}: unknown sex value {values[sex_column]!r} in column {header[sex_column]!r}. "
                    f"Expected one of {sorted(sex_values)} (any case)."
                )
            age = _parse_age(values[age_column], where) if age_column is not None else None
            row = LabelRow(image_id, age, sex_values[sex], reader.line_num)

            previous = rows.get(image_id)
            if previous is None:
                rows[image_id] = row
            elif (previous.bone_age_months, previous.male) == (row.bone_age_months, row.male):
                duplicates += 1
            else:
                raise ValueError(
                    f"{where}: id {image_id} repeats row {previous.line} with different labels "
                    f"({row.bone_age_months} vs {previous.bone_age_months} months, "
                    f"male {row.male} vs {previous.male}). Keep the correct row and remove the other."
                )
    return rows, duplicates


def stratified_validation_ids(rows: list[LabelRow], fraction: float, seed: int) -> set[str]:
    """Pick round(fraction * len(rows)) ids (at least one), stratified by sex and 50-month age band.

    Each stratum gets its floor share, and the remaining places go to the strata with the largest
    fractional shares, so the total is exact. Ids are sorted before the seeded shuffle, so the
    split does not depend on the CSV row order.
    """
    strata: dict[tuple[bool, int], list[str]] = defaultdict(list)
    for row in rows:
        band = min(int(row.bone_age_months // AGE_BAND_MONTHS), NUM_AGE_BANDS - 1)
        strata[(row.male, band)].append(row.image_id)

    keys = sorted(strata)
    shares = {key: len(strata[key]) * fraction for key in keys}
    quotas = {key: math.floor(shares[key]) for key in keys}
    target = round(fraction * len(rows))
    if target == 0 and len(rows) > 1:
        target = 1  # a tiny dataset still gets a non-empty validation split
    remaining = target - sum(quotas.values())
    for key in sorted(keys, key=lambda key: shares[key] - quotas[key], reverse=True)[:remaining]:
        quotas[key] += 1

    generator = random.Random(seed)
    chosen = set()
    for key in keys:
        ids = sorted(strata[key])
        generator.shuffle(ids)
        chosen.update(ids[: quotas[key]])
    return chosen
