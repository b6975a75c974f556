"""Group-aware re-splitting: clusters stay on one side, rows are kept once, strata stay balanced."""

from collections import Counter, defaultdict

import datasets
import pytest

from bonevision.splits import cluster_ids, group_aware_split, stratum_labels

FRACTURE_FEATURES = datasets.Features(
    {"label": datasets.ClassLabel(names=["fractured", "not fractured"]), "image_id": datasets.Value("string")}
)


def make_fracture_splits() -> tuple[datasets.DatasetDict, dict[str, int]]:
    """300 rows, 30% fractured, with clusters of 2 to 6 near-copies that straddle train and validation."""
    rows = {"train": {"label": [], "image_id": []}, "validation": {"label": [], "image_id": []}}
    groups = {}
    group = 0
    index = 0
    while index < 300:
        size = 1 if group % 3 else 2 + group % 5  # every third group is a cluster of 2..6
        label = 0 if group % 10 < 3 else 1
        for member in range(size):
            split = "validation" if (index + member) % 5 == 0 else "train"
            image_id = f"{split}/{label}/{index + member}.png"
            rows[split]["label"].append(label)
            rows[split]["image_id"].append(image_id)
            groups[image_id] = group
        index += size
        group += 1
    splits = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(columns, features=FRACTURE_FEATURES) for name, columns in rows.items()}
    )
    return splits, groups


def sides_of_groups(result: datasets.DatasetDict, groups: dict[str, int]) -> dict[int, set[str]]:
    sides = defaultdict(set)
    for name, split in result.items():
        for image_id in split["image_id"]:
            sides[groups[image_id]].add(name)
    return sides


def test_split_keeps_every_cluster_on_one_side():
    splits, groups = make_fracture_splits()
    result = group_aware_split(splits, groups, validation_fraction=0.2, seed=0)
    sides = sides_of_groups(result, groups)
    assert any(count > 1 for count in Counter(groups.values()).values())
    for group, names in sides.items():
        assert len(names) == 1, f"group {group} is in {sorted(names)}"


def test_split_keeps_every_row_once():
    splits, groups = make_fracture_splits()
    result = group_aware_split(splits, groups, validation_fraction=0.2, seed=0)
    before = sorted(list(splits["train"]["image_id"]) + list(splits["validation"]["image_id"]))
    after = sorted(list(result["train"]["image_id"]) + list(result["validation"]["image_id"]))
    assert after == before


def test_split_is_reproducible_with_seed():
    splits, groups = make_fracture_splits()
    first = group_aware_split(splits, groups, validation_fraction=0.2, seed=7)
    second = group_aware_split(splits, groups, validation_fraction=0.2, seed=7)
    other = group_aware_split(splits, groups, validation_fraction=0.2, seed=8)
    assert first["validation"]["image_id"] == second["validation"]["image_id"]
    assert first["validation"]["image_id"] != other["validation"]["image_id"]


def test_split_keeps_class_balance():
    splits, groups = make_fracture_splits()
    result = group_aware_split(splits, groups, validation_fraction=0.2, seed=0)
    pooled = Counter(list(splits["train"]["label"]) + list(splits["validation"]["label"]))
    validation = Counter(result["validation"]["label"])
    assert len(result["validation"]) == pytest.approx(60, abs=6)
    for label, count in pooled.items():
        assert validation[label] / count == pytest.approx(0.2, abs=0.04), f"class {label}"


def test_split_keeps_features():
    splits, groups = make_fracture_splits()
    result = group_aware_split(splits, groups, validation_fraction=0.2, seed=0)
    assert result["train"].features == FRACTURE_FEATURES
    assert result["validation"].features == FRACTURE_FEATURES


def test_split_makes_test_split():
    splits, groups = make_fracture_splits()
    result = group_aware_split(splits, groups, validation_fraction=0.15, test_fraction=0.15, seed=0)
    assert list(result) == ["train", "validation", "test"]
    assert len(result["test"]) == pytest.approx(45, abs=6)
    assert all(len(names) == 1 for names in sides_of_groups(result, groups).values())


def test_split_treats_unknown_ids_as_singletons():
    splits, groups = make_fracture_splits()
    partial_groups = dict(list(groups.items())[:100])
    result = group_aware_split(splits, partial_groups, validation_fraction=0.2, seed=0)
    assert len(result["train"]) + len(result["validation"]) == 300


def test_split_rejects_bad_fractions():
    splits, groups = make_fracture_splits()
    with pytest.raises(ValueError, match="validation_fraction"):
        group_aware_split(splits, groups, validation_fraction=0.0)
    with pytest.raises(ValueError, match="below 1"):
        group_aware_split(splits, groups, validation_fraction=0.5, test_fraction=0.5)


def make_bone_age_splits() -> datasets.DatasetDict:
    features = datasets.Features(
        {"bone_age_months": datasets.Value("float32"), "male": datasets.Value("bool"), "image_id": datasets.Value("string")}
    )
    train = {
        "bone_age_months": [float(months) for months in range(10, 230, 2)],
        "male": [index % 2 == 0 for index in range(110)],
        "image_id": [str(1000 + index) for index in range(110)],
    }
    test = {"bone_age_months": [None, None], "male": [True, False], "image_id": ["4360", "4361"]}
    return datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(train, features=features),
         "test": datasets.Dataset.from_dict(test, features=features)}
    )


def test_bone_age_strata_are_age_band_and_sex():
    strata = stratum_labels(make_bone_age_splits()["train"], "bone_age_months")
    assert strata[0] == "0-49 months, male"  # 10 months
    assert strata[1] == "0-49 months, female"  # 12 months
    assert strata[-1] == "200+ months, female"  # 228 months


def test_bone_age_split_keeps_unlabelled_test():
    splits = make_bone_age_splits()
    groups = {str(1000 + index): index // 2 for index in range(110)}  # pairs of rows share a group
    result = group_aware_split(splits, groups, validation_fraction=0.2, seed=0, stratify_column="bone_age_months")
    assert result["test"]["image_id"] == ["4360", "4361"]
    assert len(result["train"]) + len(result["validation"]) == 110
    assert all(len(names) == 1 for names in sides_of_groups(result, {**groups, "4360": -1, "4361": -2}).values())


def test_split_rejects_test_over_unlabelled():
    with pytest.raises(ValueError, match="unlabelled 'test'"):
        group_aware_split(make_bone_age_splits(), {}, validation_fraction=0.2, test_fraction=0.1,
                          stratify_column="bone_age_months")


def test_cluster_ids_follow_chains():
    assert cluster_ids(6, [(0, 3), (3, 5), (1, 2)]) == [0, 1, 1, 0, 2, 0]
