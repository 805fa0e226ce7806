"""The command line: predict offline, mint tokens, convert ahead of time, help everywhere."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner

from rottenbot_inference.cli import main
from tests.helpers import TEST_SECRET, class_map, jpeg_bytes, random_photo


@pytest.fixture
def runner(monkeypatch, tmp_path, shared_cache) -> CliRunner:
    monkeypatch.setenv("JWT_SECRET", TEST_SECRET)
    monkeypatch.setenv("MODEL_CACHE_DIR", str(shared_cache))
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["predict"], ["token"], ["convert"], ["export-dataset"]]
)
def test_help_everywhere(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_predict_json_and_table(runner: CliRunner, tiny_model, tmp_path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes(random_photo()))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = runner.invoke(
        main,
        ["predict", str(image), str(bad), "--model", str(tiny_model), "--json", "--top-k", "3"],
    )
    assert result.exit_code == 1  # one file failed
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    good, failed = lines
    assert good["predicted_class_name"] == class_map()[str(good["predicted_class"])]
    assert len(good["top_k"]) == 3
    assert "error" in failed
    table = runner.invoke(main, ["predict", str(image), "--model", str(tiny_model)])
    assert table.exit_code == 0
    assert good["predicted_class_name"] in table.output


def test_token_matches_the_auth_service_format(runner: CliRunner) -> None:
    user = uuid.uuid4()
    result = runner.invoke(main, ["token", "--user", str(user), "--ttl", "120"])
    assert result.exit_code == 0
    claims = jwt.decode(result.output.strip(), TEST_SECRET, algorithms=["HS256"])
    assert claims["user"] == {"user_uid": str(user)}
    assert claims["refresh"] is False
    uuid.UUID(claims["jti"])
    refresh = runner.invoke(main, ["token", "--refresh"])
    assert jwt.decode(refresh.output.strip(), TEST_SECRET, algorithms=["HS256"])["refresh"] is True


def test_convert_says_what_it_did_and_honours_cache_dir(
    runner: CliRunner, tiny_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model.parent, model, ignore=shutil.ignore_patterns("onnx-cache"))
    keras_file = model / tiny_model.name
    first, second = tmp_path / "first-cache", tmp_path / "second-cache"

    converted = runner.invoke(main, ["convert", str(model), "--cache-dir", str(first)])
    assert converted.exit_code == 0, converted.output
    (entry,) = first.glob("*.onnx")
    assert f"{keras_file}: converted to ONNX" in converted.output
    assert f"written to {entry}" in converted.output
    assert not (model / "onnx-cache").exists()  # nothing beside the model

    again = runner.invoke(main, ["convert", str(model), "--cache-dir", str(first)])
    assert again.exit_code == 0, again.output
    assert f"already converted, found in {entry}; nothing written" in again.output
    assert list(first.iterdir()) == [entry]

    # A conversion beside the model (the default place) is reused for another --cache-dir.
    (model / "onnx-cache").mkdir()
    beside = model / "onnx-cache" / entry.name
    shutil.copyfile(entry, beside)
    copied = runner.invoke(main, ["convert", str(model), "--cache-dir", str(second)])
    assert copied.exit_code == 0, copied.output
    assert f"found in {beside}; copied to {second / entry.name}" in copied.output
    assert (second / entry.name).read_bytes() == entry.read_bytes()

    default = runner.invoke(main, ["convert", str(model)])
    assert default.exit_code == 0, default.output
    assert f"found in {beside}; nothing written" in default.output


def test_convert_refuses_what_it_cannot_convert(runner: CliRunner, tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"")
    nothing = runner.invoke(main, ["convert", str(onnx)])
    assert nothing.exit_code == 0 and "is ONNX already: nothing to convert" in nothing.output
    other = tmp_path / "model.h5"
    other.write_bytes(b"")
    refused = runner.invoke(main, ["convert", str(other)])
    assert refused.exit_code == 1 and "expected a .keras or .onnx file" in refused.output
