"""Server CPU per request, split by stage: py-spy samples the serving process under a load run.

    python bench/cpu_stages.py --pid <server pid> --url http://127.0.0.1:8200 \
        --images 'bench/images/*_1024x768.jpg' --rate 60 --duration 30 --save-fraction 0.5

Each thread's CPU time over the run comes from /proc; py-spy's samples of that thread split its
time into stages by the innermost frame that names one (model, decode,
multipart, auth, outbox, upload, database, telemetry, logging, HTTP/framework). Prints a table of
CPU ms per answered request per stage (and --json writes it). Needs py-spy (the test extra, or
`--py-spy`) and the right to attach to the process (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (stage, path fragments): the innermost frame that matches any fragment names the stage.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("inference/runtime.py", "openvino_runtime.py", "onnxruntime/", "openvino/")),
    ("batching", ("inference/batcher.py", "inference/service.py")),
    ("decode+resize", ("inference/images.py", "PIL/", "cv2/", "numpy/")),
    ("multipart", ("multipart/", "starlette/formparsers.py", "api/limits.py")),
    ("auth+revocation", ("rottenbot_inference/auth/", "jwt/", "redis/")),
    ("outbox", ("storage/outbox", "sqlite3/")),
    (
        "upload (S3)",
        (
            "storage/images.py",
            "botocore/",
            "boto3/",
            "urllib3/",
            "s3transfer/",
            "storage/drainer.py",
        ),
    ),
    ("database", ("sqlalchemy/", "asyncpg/", "storage/records.py", "storage/db.py")),
    ("logging", ("logging/", "telemetry/logs.py")),
    ("telemetry", ("opentelemetry/", "prometheus_client/", "rottenbot_inference/telemetry/")),
    (
        "HTTP+framework",
        (
            "uvicorn/",
            "httptools/",
            "h11/",
            "starlette/",
            "fastapi/",
            "anyio/",
            "asyncio/",
            "uvloop/",
            "pydantic",
            "rottenbot_inference/api/",
            "concurrent/futures/",
            "threading.py",
            "queue.py",
            "selectors.py",
        ),
    ),
]


def stage_of(stack: str) -> str:
    """The stage of one collapsed stack (frames root;...;leaf)."""
    for frame in reversed(stack.split(";")[1:]):
        for stage, fragments in STAGES:
            if any(fragment in frame for fragment in fragments):
                return stage
    return "other"


# A sample whose innermost frame waits was taken while the thread was blocked, not computing.
WAITS = ("Condition.wait (", "Event.wait (", "Queue.get (", "select (", "_wait_for_tstate_lock")
THREAD = re.compile(r"^thread \((\d+)\): ")


def thread_names(raw: str) -> dict[int, str]:
    """Native thread id -> Python thread name, as py-spy reports them (pool numbers dropped)."""
    names: dict[int, str] = {}
    for line in raw.splitlines():
        match = THREAD.match(line)
        if match:
            name = line[match.end() :].split(";", 1)[0]
            names[int(match.group(1))] = re.sub(r"[_-]\d+$", "", name)
    return names


def thread_stages(raw: str) -> dict[int, Counter]:
    """Per native thread id: busy samples by stage (blocked samples left out)."""
    threads: dict[int, Counter] = {}
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        match = THREAD.match(stack)
        if not match or not count.isdigit() or stack.split(";")[-1].startswith(WAITS):
            continue
        threads.setdefault(int(match.group(1)), Counter())[stage_of(stack)] += int(count)
    return threads


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, from /proc."""
    seconds: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def split_cpu(spent: dict[int, float], samples: dict[int, Counter]) -> Counter:
    """Each thread's measured CPU seconds split by its own samples' stage shares."""
    stages: Counter = Counter()
    for tid, seconds in spent.items():
        counts = samples.get(tid)
        if not counts:
            stages["model (native threads)"] += seconds  # OpenVINO computes on its own
            continue
        total = sum(counts.values())
        for stage, n in counts.items():
            stages[stage] += seconds * n / total
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--rate", type=float, default=60)
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--save-fraction", type=float, default=0.5)
    parser.add_argument("--sample-rate", type=int, default=97)
    parser.add_argument(
        "--py-spy",
        default=shutil.which("py-spy", path=str(Path(sys.executable).parent))
        or shutil.which("py-spy")
        or "py-spy",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        raw_path, load_path = Path(temp) / "raw.txt", Path(temp) / "load.json"
        spy = subprocess.Popen(
            [
                args.py_spy,
                "record",
                "-p",
                str(args.pid),
                "-d",
                str(int(args.duration)),
                "-r",
                str(args.sample_rate),
                "--format",
                "raw",
                "--threads",
                "--nonblocking",
                "-o",
                str(raw_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        before = thread_cpu(args.pid)
        subprocess.run(
            [
                sys.executable,
                str(HERE / "loadgen.py"),
                "--url",
                args.url,
                "--images",
                args.images,
                "--rate",
                str(args.rate),
                "--duration",
                str(args.duration),
                "--save-fraction",
                str(args.save_fraction),
                "--json",
                str(load_path),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        after = thread_cpu(args.pid)
        spy.wait()
        raw = raw_path.read_text()
        samples, names = thread_stages(raw), thread_names(raw)
        load = json.loads(load_path.read_text())
    spent_by_thread = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    spent = sum(spent_by_thread.values())
    answered = max(int(load["statuses"].get("200", 0)), 1)
    per_request = {
        stage: 1000 * seconds / answered
        for stage, seconds in split_cpu(spent_by_thread, samples).items()
    }
    by_thread: Counter = Counter()
    for tid, seconds in spent_by_thread.items():
        by_thread[names.get(tid, "native (no Python frames)")] += 1000 * seconds / answered
    report = {
        "rate": args.rate,
        "save_fraction": args.save_fraction,
        "answered": answered,
        "p99_ms": load["p99"],
        "statuses": load["statuses"],
        "server_cpu_ms_per_request": round(1000 * spent / answered, 2),
        "stages_ms": {
            k: round(v, 2) for k, v in sorted(per_request.items(), key=lambda kv: -kv[1])
        },
        "threads_ms": {k: round(v, 2) for k, v in by_thread.most_common()},
    }
    print(
        f"{answered} answered, server CPU {report['server_cpu_ms_per_request']} ms/request,"
        f" p99 {load['p99']} ms, statuses {load['statuses']}"
    )
    for stage, ms in report["stages_ms"].items():
        print(f"  {stage:<18} {ms:6.2f} ms")
    print("by thread: " + ", ".join(f"{k} {v}" for k, v in report["threads_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
