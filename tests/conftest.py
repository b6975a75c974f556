"""Shared fixtures: locating the real sample radiographs next to the repository."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The samples live in ../shared/data beside the checkout; BONEVISION_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("BONEVISION_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# .ci/run sets this so that missing sample data fails the run instead of skipping tests.
REQUIRE_SHARED_DATA = os.environ.get("BONEVISION_REQUIRE_SHARED_DATA") == "1"


def _sample_dir(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        message = f"sample data not found at {path}; set BONEVISION_SHARED_DATA to the folder holding {name}/"
        if REQUIRE_SHARED_DATA:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def fracture_sample_dir() -> Path:
    """The real bone fracture sample laid out like the Kaggle download (train/ and val/ class folders)."""
    return _sample_dir("bone-fracture-sample")


@pytest.fixture(scope="session")
def bone_age_sample_dir() -> Path:
    """The real RSNA bone age sample laid out like the Kaggle download."""
    return _sample_dir("rsna-bone-age-sample")
