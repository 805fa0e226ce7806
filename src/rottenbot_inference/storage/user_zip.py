"""The caller's own data as a streamed zip: every saved image and a JSON manifest.

The zip is written to a sink that is emptied after every write, with no seeking (zipfile then
uses data descriptors), and images are copied chunk by chunk from the store: memory holds one
chunk and the manifest's small records, whatever the number or size of the images.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rottenbot_inference.storage.service import PredictionStore, SavedPrediction

MANIFEST = "manifest.json"
PAGE = 100


class _Sink:
    """A write-only, unseekable file: collects what zipfile writes until taken."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


async def zip_stream(
    store: PredictionStore, user_uid: uuid.UUID, describe: Callable[[SavedPrediction], Any]
) -> AsyncIterator[bytes]:
    """Yield the zip's bytes: `images/<uid>.<ext>` for each saved prediction, newest first,
    then `manifest.json` (`describe(saved)` of each, as the history API shows them)."""
    loop = asyncio.get_running_loop()
    sink = _Sink()
    archive = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED)  # type: ignore[arg-type]
    manifest: list[Any] = []
    cursor: str | None = None
    while True:
        page = await store.list(user_uid, limit=PAGE, cursor=cursor)
        for saved in page.items:
            record = saved.record
            image = await store.open_image(user_uid, record.uid)
            entry = describe(saved)
            if image is None:  # deleted meanwhile
                continue
            extension = (record.image_format or "").replace("jpeg", "jpg") or (
                record.image_path.rsplit(".", 1)[-1]
            )
            name = f"images/{record.uid}.{extension}"
            with archive.open(name, "w", force_zip64=True) as member:
                chunks = iter(image.chunks)
                while (chunk := await loop.run_in_executor(None, next, chunks, None)) is not None:
                    member.write(chunk)
                    if data := sink.take():
                        yield data
            manifest.append({**entry, "file": name})
            if data := sink.take():
                yield data
        cursor = page.next_cursor
        if cursor is None:
            break
    archive.writestr(MANIFEST, json.dumps({"user_uid": str(user_uid), "predictions": manifest},
                                          indent=1, default=str))
    archive.close()
    yield sink.take()
