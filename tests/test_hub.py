"""`bonevision push` against a fake HfApi: what is uploaded, retries, failures and the token never leaking."""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import metadata_load
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from test_model_card import make_run
from transformers import pipeline

from bonevision.hub import HubUploadError, add_push_arguments, push_run, run_push_command, write_examples
from bonevision.model_card import ModelCardError, load_run_record

REPO_ID = "someone/bone-test"
FAKE_TOKEN = "hf_fake_token_for_test"


class FakeHfApi:
    """Records create_repo/upload_folder calls; `failures` are raised, in order, by upload_folder."""

    def __init__(self, failures: list[BaseException] | None = None, copy_to: Path | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.failures = list(failures or [])
        self.copy_to = copy_to
        self.uploaded_files: list[str] = []

    def create_repo(self, repo_id: str, **options) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **options}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **options) -> str:
        self.calls.append(("upload_folder", options))
        if self.failures:
            raise self.failures.pop(0)
        folder = Path(options["folder_path"])
        self.uploaded_files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                                     if path.is_file())
        if self.copy_to is not None:
            shutil.copytree(folder, self.copy_to)
        return "commit"


def hash_tree(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def server_error(status: int) -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/models/someone/bone-test/commit/main")
    return HfHubHTTPError(f"{status} Server Error", response=httpx2.Response(status, request=request))


def no_sleep(delays: list[float]):
    return delays.append


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_push_creates_repo_and_uploads(run_dir: Path) -> None:
    api = FakeHfApi()
    push_run(run_dir, REPO_ID, api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": REPO_ID, "private": False, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][1]["repo_id"] == REPO_ID
    assert api.calls[1][1]["repo_type"] == "model"


def test_push_uploads_model_card_and_evaluation(run_dir: Path) -> None:
    api = FakeHfApi()
    push_run(run_dir, REPO_ID, api=api)
    assert api.uploaded_files == [
        "README.md", "config.json", "data_report.json", "evaluation/metrics.json", "evaluation/predictions.csv",
        "evaluation/report.md", "evaluation/roc_curve.png", "model.safetensors", "run_config.json",
    ]


def test_push_passes_private_flag(run_dir: Path) -> None:
    api = FakeHfApi()
    push_run(run_dir, REPO_ID, api=api, private=True)
    assert api.calls[0][1]["private"] is True


def test_push_leaves_run_dir_unchanged(run_dir: Path) -> None:
    before = hash_tree(run_dir)
    push_run(run_dir, REPO_ID, api=FakeHfApi())
    assert hash_tree(run_dir) == before


def test_dry_run_makes_no_api_call(run_dir: Path) -> None:
    api = FakeHfApi()
    result = push_run(run_dir, REPO_ID, api=api, dry_run=True)
    assert api.calls == []
    assert ("README.md", len(result.card_text.encode())) in result.files
    assert result.card_text.startswith("---\n")


def test_connection_error_retried_then_uploaded(run_dir: Path) -> None:
    delays: list[float] = []
    api = FakeHfApi(failures=[httpx2.ConnectError("connection refused")])
    push_run(run_dir, REPO_ID, api=api, sleep=no_sleep(delays))
    assert delays == [2.0]
    assert "README.md" in api.uploaded_files


def test_server_error_retried_with_backoff(run_dir: Path) -> None:
    delays: list[float] = []
    api = FakeHfApi(failures=[server_error(503), server_error(502)])
    push_run(run_dir, REPO_ID, api=api, sleep=no_sleep(delays))
    assert delays == [2.0, 4.0]


def test_failure_after_retries_is_clear(run_dir: Path) -> None:
    delays: list[float] = []
    api = FakeHfApi(failures=[ConnectionError("network is unreachable")] * 3)
    with pytest.raises(HubUploadError) as raised:
        push_run(run_dir, REPO_ID, api=api, sleep=no_sleep(delays))
    message = str(raised.value)
    assert f"upload to {REPO_ID} failed after 3 attempts" in message
    assert "network is unreachable" in message
    assert "the run folder is unchanged, rerun bonevision push" in message


def test_failed_push_leaves_run_dir_unchanged(run_dir: Path) -> None:
    before = hash_tree(run_dir)
    with pytest.raises(HubUploadError):
        push_run(run_dir, REPO_ID, api=FakeHfApi(failures=[server_error(500)] * 3), sleep=no_sleep([]))
    assert hash_tree(run_dir) == before


def test_client_error_not_retried(run_dir: Path) -> None:
    delays: list[float] = []
    api = FakeHfApi(failures=[server_error(401)])
    with pytest.raises(HubUploadError, match="hf auth login"):
        push_run(run_dir, REPO_ID, api=api, sleep=no_sleep(delays))
    assert delays == []
    assert len(api.calls) == 2


def test_unexpected_error_propagates(run_dir: Path) -> None:
    api = FakeHfApi(failures=[TypeError("upload_folder() got an unexpected keyword argument")])
    with pytest.raises(TypeError, match="unexpected keyword"):
        push_run(run_dir, REPO_ID, api=api, sleep=no_sleep([]))


def test_token_never_logged_or_written(run_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    caplog.set_level(logging.DEBUG)
    uploaded = tmp_path / "uploaded"
    api = FakeHfApi(failures=[ConnectionError(f"proxy rejected Authorization: Bearer {FAKE_TOKEN}")],
                    copy_to=uploaded)
    push_run(run_dir, REPO_ID, api=api, sleep=no_sleep([]))
    assert "proxy rejected" in caplog.text
    assert FAKE_TOKEN not in caplog.text
    for path in uploaded.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_local_path_in_report_stops_push(run_dir: Path, tmp_path: Path) -> None:
    staged = tmp_path / "copy"
    shutil.copytree(run_dir, staged)
    (staged / "evaluation" / "report.md").write_text("- data: /home/someone/downloads/bones\n")
    api = FakeHfApi()
    with pytest.raises(ModelCardError, match="report.md"):
        push_run(staged, REPO_ID, api=api)
    assert api.calls == []


def test_bone_age_push_shares_no_images(tmp_path: Path, bone_age_sample_dir: Path) -> None:
    run_dir = make_run(tmp_path, task="bone-age", backbone="vit-tiny-test")
    result = push_run(run_dir, REPO_ID, dry_run=True, examples_from=bone_age_sample_dir,
                      dataset_cache_dir=tmp_path / "cache")
    paths = [path for path, _ in result.files]
    assert "LICENSE.md" in paths
    assert "evaluation/predictions.csv" not in paths
    assert not any(path.startswith("examples/") for path in paths)


def fracture_validation_ids(sample_dir: Path) -> list[tuple[str, str]]:
    """Two real validation images per class, as image ids relative to the data root."""
    rows = []
    for label in ("fractured", "not fractured"):
        names = sorted(path.name for path in (sample_dir / "val" / label).iterdir() if path.suffix == ".jpg")
        rows += [(f"val/{label}/{name}", label) for name in names[:2]]
    return rows


@pytest.fixture(scope="module")
def pushed_with_examples(tmp_path_factory, fracture_sample_dir: Path):
    root = tmp_path_factory.mktemp("examples")
    run_dir = make_run(root, prediction_rows=fracture_validation_ids(fracture_sample_dir))
    uploaded = root / "uploaded"
    push_run(run_dir, REPO_ID, api=FakeHfApi(copy_to=uploaded), examples_from=fracture_sample_dir,
             dataset_cache_dir=root / "cache")
    return run_dir, uploaded


def test_examples_uploaded_as_small_pngs(pushed_with_examples) -> None:
    _, uploaded = pushed_with_examples
    examples = sorted((uploaded / "examples").iterdir())
    assert [path.name for path in examples] == ["example-1-fractured.png", "example-2-not-fractured.png",
                                                "example-3-fractured.png"]
    for path in examples:
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert max(image.size) <= 512


def test_widget_points_at_uploaded_examples(pushed_with_examples) -> None:
    _, uploaded = pushed_with_examples
    widget = metadata_load(uploaded / "README.md")["widget"]
    assert [item["src"] for item in widget] == [
        f"https://huggingface.co/{REPO_ID}/resolve/main/examples/example-{number}-{label}.png"
        for number, label in [(1, "fractured"), (2, "not-fractured"), (3, "fractured")]]
    assert widget[0]["example_title"] == "Reference: fractured"


def test_widget_outputs_are_model_outputs(pushed_with_examples) -> None:
    run_dir, uploaded = pushed_with_examples
    widget = metadata_load(uploaded / "README.md")["widget"]
    classifier = pipeline("image-classification", model=str(run_dir / "model"))
    with Image.open(uploaded / "examples" / "example-2-not-fractured.png") as image:
        expected = classifier(image)
    assert [item["label"] for item in widget[1]["output"]] == [item["label"] for item in expected]
    assert widget[1]["output"][0]["score"] == pytest.approx(expected[0]["score"], abs=1e-4)


def test_examples_downscaled_like_evaluation(tmp_path: Path, fracture_sample_dir: Path) -> None:
    run_dir = make_run(tmp_path, prediction_rows=fracture_validation_ids(fracture_sample_dir), shorter_side=37)
    examples = write_examples(load_run_record(run_dir), fracture_sample_dir, tmp_path / "examples",
                              cache_dir=tmp_path / "cache")
    for example in examples:
        with Image.open(tmp_path / "examples" / example.file_name) as image:
            assert min(image.size) == 37


def test_bone_age_examples_give_months(tmp_path: Path, bone_age_sample_dir: Path) -> None:
    from hf_datasets.rsna_bone_age import load_rsna_bone_age

    validation = load_rsna_bone_age(bone_age_sample_dir, seed=42, cache_dir=str(tmp_path / "cache"))["validation"]
    rows = [(image_id, months) for image_id, months in zip(validation["image_id"][:3],
                                                             validation["bone_age_months"][:3])]
    run_dir = make_run(tmp_path, task="bone-age", backbone="vit-tiny-test", prediction_rows=rows)
    examples = write_examples(load_run_record(run_dir), bone_age_sample_dir, tmp_path / "examples",
                              cache_dir=tmp_path / "cache")
    assert len(examples) == 3
    assert [example.outputs[0]["label"] for example in examples] == ["bone_age_months"] * 3
    assert examples[0].reference.endswith(" months")


def test_examples_from_wrong_data_dir_raise(tmp_path: Path, fracture_sample_dir: Path) -> None:
    run_dir = make_run(tmp_path, prediction_rows=[("val/fractured/missing.jpg", "fractured")])
    with pytest.raises(ValueError, match="missing.jpg"):
        push_run(run_dir, REPO_ID, dry_run=True, examples_from=fracture_sample_dir,
                 dataset_cache_dir=tmp_path / "cache")


def test_cli_dry_run_lists_files_and_card(run_dir: Path, capsys) -> None:
    parser = add_push_arguments(argparse.ArgumentParser())
    run_push_command(parser.parse_args([str(run_dir), "--repo-id", REPO_ID, "--dry-run"]))
    output = capsys.readouterr().out
    assert f"Would upload 9 files to {REPO_ID}:" in output
    assert "  evaluation/metrics.json  (" in output
    assert "model-index:" in output
