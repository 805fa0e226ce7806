"""Command line: `rottenbot-inference serve | predict | token | convert`."""

from __future__ import annotations

import functools
import json
import sys
import uuid
from pathlib import Path

import click

from rottenbot_inference.settings import Settings


def _configure_logging(settings: Settings) -> None:
    """JSON lines with trace ids (text on a terminal or with LOG_FORMAT=text); see telemetry."""
    from rottenbot_inference.telemetry import configure_logging

    configure_logging(settings)


def worker_app() -> object:
    """The app of one uvicorn worker process (`--workers` > 1): logging first, then the app."""
    from rottenbot_inference.app import create_app

    settings = Settings()
    _configure_logging(settings)
    return create_app(settings)


def _exit_zero_after_graceful_shutdown() -> None:
    """After a graceful shutdown uvicorn re-raises the signal that stopped it, with the
    handler that was there before it started; make that handler a no-op, so that a drained
    process exits 0 instead of dying of the signal (see shutdown.py for the sequence)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rottenbot-inference")
def main() -> None:
    """RottenBot inference service: is this fruit or vegetable healthy or rotten?

    Configuration comes from environment variables (see the README); options override them.
    """


@main.command()
@click.option("--host", default=None, help="Interface to bind [env HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="TCP port [env PORT, default 8000].")
@click.option("--workers", type=int, default=None, help="Processes, each with its own model.")
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the HTTP API (uvicorn with uvloop and httptools)."""
    import uvicorn

    from rottenbot_inference.http_protocol import HeaderTimeoutProtocol

    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v}
    settings = Settings(**overrides)
    _configure_logging(settings)
    common = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        # httptools, plus a deadline on request headers (slow-loris; see http_protocol.py)
        "http": functools.partial(
            HeaderTimeoutProtocol, header_timeout_s=settings.header_read_timeout_s
        ),
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "timeout_keep_alive": 30,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,  # in-flight requests
        "backlog": 2048,
        "server_header": False,
    }
    if settings.workers > 1:
        uvicorn.run(
            "rottenbot_inference.cli:worker_app",
            factory=True,
            workers=settings.workers,
            **common,
        )
        return

    from rottenbot_inference.app import create_app

    failure: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failure.append(exc)
        server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(create_app(settings, on_fatal=on_fatal), **common))
    _exit_zero_after_graceful_shutdown()
    server.run()
    if failure:
        raise click.ClickException(f"the model could not be loaded: {failure[0]}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True), help="Model path.")
@click.option("--top-k", type=int, default=1, show_default=True, help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def predict(images: tuple[str, ...], model_path: str | None, top_k: int, as_json: bool) -> None:
    """Classify image files offline, without a server."""
    from rottenbot_inference.inference.images import ImageError, ImagePreprocessor
    from rottenbot_inference.inference.loader import ModelLoader, source_from_settings
    from rottenbot_inference.inference.service import rank

    settings = Settings(**({"model_path": Path(model_path)} if model_path else {}))
    _configure_logging(settings.model_copy(update={"log_level": "warning"}))
    bundle = ModelLoader(settings).load(source_from_settings(settings))
    preprocessor = ImagePreprocessor(
        bundle.image_size, settings.max_image_pixels, settings.jpeg_dct_scaling
    )
    failed = False
    for name in images:
        try:
            prepared = preprocessor.prepare(Path(name).read_bytes())
        except ImageError as exc:
            failed = True
            _emit_error(name, str(exc), as_json)
            continue
        probabilities = bundle.predict(prepared.pixels[None])[0]
        ranked = rank(probabilities, bundle.class_names, top_k)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "file": name,
                        "predicted_class": ranked[0].index,
                        "predicted_class_name": ranked[0].name,
                        "confidence": ranked[0].confidence,
                        "model_version": bundle.version,
                        "top_k": [
                            {"class": s.index, "class_name": s.name, "confidence": s.confidence}
                            for s in ranked
                        ],
                    }
                )
            )
        else:
            for position, score in enumerate(ranked):
                label = name if position == 0 else ""
                click.echo(f"{label:<40} {score.name:<24} {score.confidence:8.4f}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where to write the conversion [default: onnx-cache/ beside the model file, "
    "where the service finds it without TensorFlow].",
)
def convert(model: Path, cache_dir: Path | None) -> None:
    """Convert a Keras model to ONNX ahead of time (needs the keras extra), e.g. in a build."""
    from rottenbot_inference.inference.loader import (
        BUNDLED_CACHE_NAME,
        ModelLoader,
        ModelLoadError,
        model_file,
    )

    try:
        path = model_file(model)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    if path.suffix == ".onnx":
        click.echo(f"{path} is ONNX already: nothing to convert")
        return
    target = cache_dir or path.parent / BUNDLED_CACHE_NAME
    settings = Settings(model_cache_dir=target, model_runtime="onnxruntime", model_precision="auto")
    _configure_logging(settings.model_copy(update={"log_level": "warning"}))
    try:
        outcome = ModelLoader(settings).convert(path)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(outcome.describe(path))


def _emit_error(name: str, message: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"file": name, "error": message}))
    else:
        click.echo(f"{name:<40} error: {message}", err=True)


@main.command()
@click.option("--user", "user_uid", type=click.UUID, default=None, help="User uid (default: new).")
@click.option("--ttl", type=int, default=3600, show_default=True, help="Lifetime in seconds.")
@click.option("--refresh", is_flag=True, help="Mint a refresh token (the API refuses those).")
def token(user_uid: uuid.UUID | None, ttl: int, refresh: bool) -> None:
    """Mint a development access token signed with JWT_SECRET (as the auth service does)."""
    from rottenbot_inference.auth.tokens import mint_token

    settings = Settings()
    click.echo(
        mint_token(
            settings.jwt_secret.get_secret_value(),
            settings.jwt_algorithm,
            user_uid or uuid.uuid4(),
            ttl_s=ttl,
            refresh=refresh,
        )
    )


@main.command("export-dataset")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created; a re-run resumes it).")
@click.option("--since", type=click.DateTime(), default=None,
              help="Only predictions made at or after this time (UTC).")
@click.option("--until", type=click.DateTime(), default=None,
              help="Only predictions made before this time (UTC).")
@click.option("--model-version", default=None, help="Only this model version's predictions.")
@click.option("--labels", type=click.Choice(["feedback", "predicted", "both"]), default="both",
              show_default=True,
              help="feedback: owners' corrections only; predicted: the predicted class; both: "
              "feedback where given, else the prediction.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Predicted labels only at or above this confidence.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), default=None,
              help="index_to_class.json giving the class order [default: the model's, beside "
              "MODEL_PATH / CLASSES_PATH].")
@click.option("--jobs", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Parallel downloads.")
@click.option("--salt", envvar="EXPORT_USER_SALT", default=None,
              help="Hex salt for the user hashes [env EXPORT_USER_SALT; default: a random one "
              "kept in OUT/.export-salt].")
def export_dataset(
    out: Path, since: object, until: object, model_version: str | None, labels: str,
    min_confidence: float, classes_file: Path | None, jobs: int, salt: str | None,
) -> None:
    """Export saved predictions as OUT/<class>/<uid>.<ext> + manifest.csv (for training).

    Reads the database and image store the service uses (DATABASE_URL, S3 settings). Exit
    status 3: the database cannot be reached; 4: the image store cannot be reached.
    """
    import asyncio

    from rottenbot_inference.storage.export import ExportError, ExportFilter
    from rottenbot_inference.storage.export_cli import run_export, utc

    settings = Settings()
    _configure_logging(settings.model_copy(update={"log_level": "warning"}))
    selection = ExportFilter(
        since=utc(since), until=utc(until), model_version=model_version,
        labels=labels,  # type: ignore[arg-type]
        min_confidence=min_confidence,
    )
    try:
        salt_bytes = bytes.fromhex(salt) if salt else None
    except ValueError as exc:
        raise click.BadParameter("the salt must be hex", param_hint="--salt") from exc
    try:
        summary = asyncio.run(
            run_export(settings, out, selection, classes_file, jobs, salt_bytes)
        )
    except ExportError as exc:
        click.echo(f"export-dataset: {exc}", err=True)
        sys.exit(exc.code)
    click.echo(
        f"{summary.total} images in {out} ({summary.exported} downloaded, {summary.reused} "
        f"already there); {summary.duplicates} duplicates, {summary.missing} missing, "
        f"{summary.unknown_class} with an unknown class skipped; {summary.removed} stale "
        "files removed"
    )
