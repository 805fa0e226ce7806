"""Keras -> ONNX conversion in a child process, so TensorFlow never enters the server.

The reloader runs `python -m rottenbot_inference.inference.convert_child convert MODEL
--cache-dir DIR ...` (niced when it converts beside a serving model). The child writes the
verified conversion into the cache and prints one JSON line: `{"ok": true}`, or the error and
whether the conversion was merely unfaithful (ONNX differs from Keras: MODEL_RUNTIME=auto may
then fall back to Keras in-process).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rottenbot_inference.inference.loader import ModelLoader, ModelLoadError
from rottenbot_inference.settings import Settings

log = logging.getLogger(__name__)

MODULE = "rottenbot_inference.inference.convert_child"
UNFAITHFUL_MARKERS = ("ONNX output differs", "ONNX conversion failed")


class Unfaithful(ModelLoadError):
    """The ONNX conversion does not match Keras (MODEL_RUNTIME=auto may fall back to Keras)."""


def describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"


class ConversionChild:
    """Runs conversions in child processes, one at a time; `kill()` ends the running one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def kill(self) -> None:
        with self._lock:
            child = self._child
        if child is not None and child.poll() is None:
            child.kill()

    def run(self, path: Path, nice: int) -> None:
        """Convert `path` into the ONNX cache; raises ModelLoadError (Unfaithful: mismatch)."""
        settings = self.settings
        command = [
            sys.executable, "-m", MODULE, "convert", str(path),
            "--cache-dir", str(settings.cache_dir),
            "--threads", str(settings.effective_inference_threads),
            "--tolerance", repr(settings.verify_tolerance),
            "--nice", str(nice),
        ]
        log.info("converting %s to ONNX in a child process (nice %d)", path, nice)
        started = time.monotonic()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        with self._lock:
            self._child = child
        try:
            stdout, stderr = child.communicate(timeout=settings.model_convert_timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            raise ModelLoadError(
                f"converting {path.name} took longer than {settings.model_convert_timeout_s:g} s "
                "(MODEL_CONVERT_TIMEOUT_S)"
            ) from None
        finally:
            with self._lock:
                self._child = None
        report = _last_json(stdout)
        if child.returncode == 0 and report.get("ok"):
            log.info("converted %s in %.1f s (child process)", path.name,
                     time.monotonic() - started)
            return
        error = report.get("error") or _tail(stderr) or f"exit status {child.returncode}"
        if report.get("unfaithful"):
            raise Unfaithful(f"{path.name}: {error}")
        raise ModelLoadError(f"converting {path.name} failed: {error}")


def _last_json(output: bytes) -> dict[str, Any]:
    for line in reversed(output.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _tail(output: bytes, lines: int = 3) -> str:
    text = output.decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:])


# -- the child ---------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="convert a .keras model into the ONNX cache")
    convert.add_argument("model", type=Path)
    convert.add_argument("--cache-dir", type=Path, required=True)
    convert.add_argument("--threads", type=int, default=1)
    convert.add_argument("--tolerance", type=float, default=1e-4)
    convert.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model_cache_dir=args.cache_dir,
        inference_threads=args.threads,
        verify_tolerance=args.tolerance,
        model_runtime="onnxruntime",  # an unfaithful conversion is an error here
        model_precision="auto",  # whatever MODEL_PRECISION the server has (bf16 needs OpenVINO)
    )
    try:
        ModelLoader(settings).convert(args.model)
    except Exception as exc:
        message = describe_error(exc)
        unfaithful = any(marker in message for marker in UNFAITHFUL_MARKERS)
        print(json.dumps({"ok": False, "error": message, "unfaithful": unfaithful}), flush=True)
        return 1
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
