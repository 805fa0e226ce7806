"""Real small volumes for the outbox tests: a tmpfs, and ext4 in a loop-mounted image file that a
test can fail like a bad disk or copy like a disk after a power cut. Mounting needs root (CI runs
as root): under CI=true a volume that cannot be mounted fails the test, elsewhere it skips."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import in_ci

MiB = 1024 * 1024


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False)


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    result = _run("mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder))
    if result.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        _run("umount", "-l", str(folder))


def make_ext4_image(image: Path, size_mb: int) -> Path:
    with image.open("wb") as handle:
        handle.truncate(size_mb * MiB)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode != 0:
        unavailable(f"mkfs.ext4 failed: {made.stderr.strip()}")
    return image


@contextlib.contextmanager
def loop_mounted(image: Path, folder: Path, *options: str) -> Iterator[Path]:
    """`image` mounted on `folder` through a loop device (read-write), unmounted after."""
    folder.mkdir(parents=True, exist_ok=True)
    result = _run("mount", "-o", ",".join(("loop", *options)), str(image), str(folder))
    if result.returncode != 0:
        unavailable(f"cannot loop-mount an ext4 image (needs root and loop devices): "
                    f"{result.stderr.strip()}")
    try:
        yield folder
    finally:
        _run("umount", "-l", str(folder))


class Ext4Volume:
    """A loop-mounted ext4 image that the test can make fail like a bad disk."""

    def __init__(self, folder: Path, image: Path) -> None:
        self.folder, self.image = folder, image

    def fail(self) -> None:
        """An ext4 error: the kernel remounts the volume read-only at once, open files or not."""
        device = Path(_run("findmnt", "-n", "-o", "SOURCE", str(self.folder)).stdout.strip())
        Path(f"/sys/fs/ext4/{device.name}/trigger_fs_error").write_text("test: disk failure")

    def repair_and_mount(self, read_only: bool) -> None:
        subprocess.run(["umount", str(self.folder)], check=True)
        _run("e2fsck", "-fy", str(self.image))
        # Mounted read-write first: a read-only loop mount would attach the device read-only.
        subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.image),
                        str(self.folder)], check=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True)

    def remount_writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.folder)], check=True)


@contextlib.contextmanager
def mounted_ext4(folder: Path, size_mb: int) -> Iterator[Ext4Volume]:
    """A fresh ext4 volume on `folder` that remounts itself read-only on an error."""
    image = make_ext4_image(folder.with_suffix(".img"), size_mb)
    try:
        with loop_mounted(image, folder, "errors=remount-ro"):
            yield Ext4Volume(folder, image)
    finally:
        image.unlink(missing_ok=True)
