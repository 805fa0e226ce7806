"""Cut from the runtime image's virtual environment what the service never imports at run time.

Run by the Dockerfile's `slim` stage (`python slim_venv.py --strip /opt/venv`); prints the size of
each package before and after. It removes installers (pip, setuptools), test suites, type stubs,
C headers and Cython sources, onnxruntime's model tools and its C-API library (Python loads only
the pybind module), numpy's f2py, every botocore service description but S3's, all of OpenVINO
but its CPU plugin and its ONNX (and IR) frontends, and Pillow's codecs for formats the service
never reads or writes. `--strip` removes symbol tables and
debug information from extension modules (`strip --strip-unneeded`; libraries that auditwheel
grafted into `*.libs/` are left alone: they come stripped, and patchelf rewrote them). Then it
compiles bytecode only for what the service imports - its own package, everything its modules
import, and the backends it imports lazily (storage, MLflow, OTLP) - and checks on the way that
nothing it needs was cut: ONNX Runtime runs each bundled model and OpenVINO compiles it for the
CPU. The image's root filesystem is read-only, so a module without a .pyc would be compiled in
memory at every start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# OpenVINO frontends (model formats) the service never reads: it hands OpenVINO ONNX files.
OPENVINO_FRONTENDS_CUT = ("tensorflow", "tensorflow_lite", "pytorch", "paddle", "jax", "gguf")
OPENVINO_PLUGINS_CUT = ("intel_gpu", "intel_npu", "auto", "auto_batch", "hetero")
PILLOW_LIBS_CUT = ("libavif", "libwebp", "libwebpmux", "libwebpdemux", "libsharpyuv",
                   "libfreetype", "libharfbuzz", "libbrotlicommon", "libbrotlidec", "libpng16")
# Relative to site-packages; globs.
CUT = (
    "pip", "pip-*.dist-info", "setuptools", "setuptools-*.dist-info", "pkg_resources",
    "_distutils_hack", "distutils-precedence.pth",
    "**/tests",
    "numpy/f2py", "numpy/distutils", "numpy/_pyinstaller",
    "onnxruntime/transformers", "onnxruntime/quantization", "onnxruntime/tools",
    "onnxruntime/datasets", "onnxruntime/capi/libonnxruntime.so*",
    "**/*.pyi", "**/*.pyx", "**/*.pxd", "**/*.pxi", "**/*.h", "numpy/_core/include",
    # OpenVINO: the service compiles ONNX models for the CPU only. Other devices' plugins (and
    # the GPU plugin's kernel cache, cache.json), other model formats' frontends, the C API,
    # the model converter and benchmark tools, headers and CMake files go.
    *(f"openvino/libs/libopenvino_{name}_plugin.so" for name in OPENVINO_PLUGINS_CUT),
    "openvino/libs/cache.json",
    "openvino/libs/libopenvino_c.so*",
    *(f"openvino/libs/libopenvino_{name}_frontend.so*" for name in OPENVINO_FRONTENDS_CUT),
    *(f"openvino/frontend/{name}" for name in OPENVINO_FRONTENDS_CUT),
    "openvino/include", "openvino/cmake", "openvino/tools", "openvino/torch",
    # Pillow decodes only what sniffing let through (JPEG, PNG) and encodes PNG: its AVIF and
    # WebP codecs, font rendering (FreeType, HarfBuzz, Brotli, the libpng FreeType uses) and Tk
    # glue go. Its plugins for them report the codec missing instead (features.check).
    "PIL/_avif.*", "PIL/_webp.*", "PIL/_imagingft.*", "PIL/_imagingtk.*",
    *(f"pillow.libs/{name}-*" for name in PILLOW_LIBS_CUT),
)
# botocore/data/<service>/: only these services are kept (the files at data/'s top stay).
BOTOCORE_SERVICES = frozenset({"s3"})
# Imported lazily by the service (after start, or only when configured): compiled too.
LAZY = (
    "mlflow", "mlflow.client", "mlflow.artifacts", "mlflow.tracking",
    "boto3", "botocore.client",
    "sqlalchemy.dialects.postgresql.asyncpg", "sqlalchemy.dialects.sqlite.aiosqlite",
    "asyncpg", "aiosqlite", "alembic.command", "alembic.runtime.migration", "alembic.op",
    "redis.asyncio",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc._log_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "uvicorn.loops.uvloop", "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.h11_impl", "uvicorn.lifespan.on",
)
# Only the model converter (builder-keras) has these; cv2 draws the demo's training images.
CONVERTER_ONLY = ("tensorflow", "keras", "tf2onnx", "onnx", "cv2")

WARM = r"""
import importlib, pkgutil, sys
import rottenbot_inference
for info in pkgutil.walk_packages(rottenbot_inference.__path__, "rottenbot_inference."):
    if info.name.endswith(("__main__", "migrations.env")):  # run on import: compileall's
        continue
    try:
        importlib.import_module(info.name)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in CONVERTER_ONLY:
            raise
for name in LAZY:
    importlib.import_module(name)
import boto3
boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
             aws_access_key_id="x", aws_secret_access_key="y")
from pathlib import Path
import numpy as np, onnxruntime
models = sorted(Path(rottenbot_inference.__file__).parent.glob("models/**/*.onnx"))
for path in models:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [dim if isinstance(dim, int) else 1 for dim in spec.shape]
    session.run(None, {spec.name: np.zeros(shape, np.float32)})
import io
from PIL import Image
from rottenbot_inference.inference.images import ImagePreprocessor
prepare = ImagePreprocessor((32, 32), 10**6).prepare
for kind in ("JPEG", "PNG"):  # the image pipeline on what Pillow has left
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(buffer, kind)
    assert prepare(buffer.getvalue()).pixels.shape == (32, 32, 3)
import openvino
core = openvino.Core()
assert core.available_devices == ["CPU"], core.available_devices
frontends = openvino.frontend.FrontEndManager().get_available_front_ends()
assert "onnx" in frontends, frontends
for path in models:
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    shape = [max(dim, 1) for dim in compiled.inputs[0].get_partial_shape().get_min_shape()]
    compiled(np.zeros(shape, np.float32))
print(f"warm imports: {len(sys.modules)} modules, {len(models)} ONNX model(s) run by ONNX "
      f"Runtime and compiled by OpenVINO for {core.available_devices} (frontends {frontends})")
"""


def site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def sizes(site: Path) -> Counter[str]:
    """Bytes per top-level entry of site-packages (a package with its .libs folder)."""
    total: Counter[str] = Counter()
    for folder, _, files in os.walk(site):
        top = Path(folder).relative_to(site).parts
        for name in files:
            key = top[0] if top else name
            key = key.removesuffix(".libs")
            total[key] += (Path(folder) / name).lstat().st_size
    return total


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def cut(site: Path) -> None:
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache)
    for pattern in CUT:
        for path in sorted(site.glob(pattern), reverse=True):
            if path.exists():
                remove(path)
    data = site / "botocore" / "data"
    for service in data.iterdir():
        if service.is_dir() and service.name not in BOTOCORE_SERVICES:
            shutil.rmtree(service)


def strip(site: Path) -> int:
    """`strip --strip-unneeded` each extension module outside `*.libs/`; bytes saved."""
    saved = 0
    for path in sorted(site.rglob("*.so*")):
        if path.is_symlink() or not path.is_file() or any(
            part.endswith(".libs") for part in path.relative_to(site).parts
        ):
            continue
        stripped = path.with_name(path.name + ".stripped")
        result = subprocess.run(
            ["strip", "--strip-unneeded", "-o", str(stripped), str(path)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:  # not an ELF file, or one strip cannot rewrite: kept
            stripped.unlink(missing_ok=True)
            continue
        before, after = path.stat().st_size, stripped.stat().st_size
        if after < before:
            shutil.copymode(path, stripped)
            stripped.replace(path)
            saved += before - after
        else:
            stripped.unlink()
    return saved


def warm(venv: Path, site: Path) -> None:
    """Import what the service imports with the venv's Python, writing .pyc files."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    prelude = f"CONVERTER_ONLY = {CONVERTER_ONLY!r}\nLAZY = {LAZY!r}\n"
    subprocess.run([str(venv / "bin" / "python"), "-c", prelude + WARM], check=True, env=env)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "compileall", "-q",
         str(site / "rottenbot_inference")],
        check=True, env=env,
    )


def report(before: Counter[str], after: Counter[str], top: int = 25) -> None:
    mb = 1_000_000
    print(f"{'package':36} {'before MB':>10} {'after MB':>9}")
    for name, size in before.most_common(top):
        print(f"{name:36} {size / mb:10.1f} {after.get(name, 0) / mb:9.1f}")
    print(f"{'total':36} {sum(before.values()) / mb:10.1f} {sum(after.values()) / mb:9.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--strip", action="store_true", help="strip extension modules")
    args = parser.parse_args()
    site = site_packages(args.venv)
    before = sizes(site)
    cut(site)
    for script in args.venv.glob("bin/pip*"):
        script.unlink()
    if args.strip:
        print(f"strip --strip-unneeded: {strip(site) / 1e6:.1f} MB saved")
    warm(args.venv, site)
    report(before, sizes(site))
    return 0


if __name__ == "__main__":
    sys.exit(main())
