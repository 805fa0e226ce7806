"""Run the service on the production-like local stack until Ctrl-C (for soak/overload runs).

    python bench/serve_stack.py --model /tmp/prod --port 8200

Starts PostgreSQL, an S3 stand-in (rclone, or --s3 moto) and redis-server on loopback (as sweep.py),
then the service configured for them on the given port, and prints the JWT secret to use
with the load scripts (`JWT_SECRET=... python bench/soak.py --url ...`). Ctrl-C (or SIGTERM)
stops everything.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.helpers import TEST_SECRET  # noqa: E402

from sweep import Stack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--s3", choices=["rclone", "moto"], default="rclone")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with tempfile.TemporaryDirectory(prefix="serve-stack-") as temp:
        stack = Stack(Path(temp), args.model, args.s3)
        try:
            service = stack.service("service")
            url = service.start(port=args.port)
            print(f"serving {url} (pid {service.process.pid}); JWT_SECRET={TEST_SECRET}",
                  flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
            service.stop()
        finally:
            stack.close()


if __name__ == "__main__":
    main()
