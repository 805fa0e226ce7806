"""The command line: predict offline, mint tokens, help everywhere."""

from __future__ import annotations

import json
import uuid

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


@pytest.mark.parametrize("command", [[], ["serve"], ["predict"], ["token"]])
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
