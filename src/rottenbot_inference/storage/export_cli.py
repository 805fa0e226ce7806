"""What `export-dataset` needs around the Exporter: class order, backends, progress, errors."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import click

from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.export import (
    DATABASE_UNREACHABLE,
    Exporter,
    ExportError,
    ExportFilter,
    Summary,
    count_rows,
    probe,
    stream_rows,
)

PLAIN_EVERY = 1000  # without a terminal: a line per this many images


def utc(value: Any) -> dt.datetime | None:
    """A click.DateTime (naive: taken as UTC) as an aware UTC datetime."""
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def class_order(settings: Settings, classes_file: Path | None) -> tuple[str, ...]:
    """The model's classes by index: --classes, else index_to_class.json of the local model."""
    from rottenbot_inference.inference.loader import (
        LocalArtifact,
        ModelLoadError,
        load_class_names,
        parse_class_map,
    )

    try:
        if classes_file is not None:
            return parse_class_map(json.loads(classes_file.read_text()), classes_file)
        artifact = LocalArtifact(settings.model_path, "local", settings.model_path.name,
                                 classes_path=settings.classes_path)
        return load_class_names(artifact)
    except (ModelLoadError, ValueError, OSError) as exc:
        raise click.ClickException(
            f"cannot tell the model's classes ({exc}); pass --classes index_to_class.json"
        ) from exc


class Progress:
    """A progress bar on a terminal, a plain line every PLAIN_EVERY images otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.shown = 0
        self.bar: Any = None
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=total, label="exporting", file=sys.stderr)
            self.bar.__enter__()
        else:
            click.echo(f"exporting up to {total} images", err=True)

    def __call__(self, summary: Summary) -> None:
        done = summary.total + summary.duplicates + summary.missing
        if self.bar is not None:
            self.bar.update(done - self.shown)
        elif done // PLAIN_EVERY > self.shown // PLAIN_EVERY:
            click.echo(f"{done}/{self.total} done ({summary.exported} downloaded, "
                       f"{summary.reused} already there)", err=True)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


async def run_export(
    settings: Settings, out: Path, selection: ExportFilter, classes_file: Path | None,
    jobs: int, salt: bytes | None,
) -> Summary:
    from sqlalchemy.exc import SQLAlchemyError

    from rottenbot_inference.storage.db import create_engine, database_url
    from rottenbot_inference.storage.images import build_image_store

    classes = class_order(settings, classes_file)
    images = build_image_store(settings)
    probe(images)
    engine = create_engine(database_url(settings), timeout_s=settings.database_timeout_s,
                           command_timeout=600.0)
    try:
        try:
            total = await count_rows(engine, selection)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise ExportError(f"the database cannot be reached: {exc}",
                              DATABASE_UNREACHABLE) from exc
        progress = Progress(total)
        exporter = Exporter(out, classes, images, salt=salt, jobs=jobs, progress=progress)
        try:
            return await exporter.run(stream_rows(engine, selection))
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
                raise
            raise ExportError(f"the database cannot be reached: {exc}",
                              DATABASE_UNREACHABLE) from exc
        finally:
            progress.close()
    finally:
        await engine.dispose()
