"""Write the README's example explanation: a synthetic rotten banana and its heatmap overlay.

    PYTHONPATH=src python scripts/explain_example.py --out docs/img/explanation-example.png

Starts the service in-process on its defaults (the bundled demo model), sends the picture to
`POST /api/v1/inference/explain?format=png` and saves the upload and the answer side by side
(scaled to 2/3, 128-colour PNG, to keep the committed file small). Prints the JSON answer's
class, contrast and peak cell.
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import cv2
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from rottenbot_inference.app import create_app
from rottenbot_inference.auth.tokens import mint_token
from rottenbot_inference.demo.synthetic import CLASS_NAMES, render
from rottenbot_inference.settings import DEV_JWT_SECRET, Settings

EXPLAIN = "/api/v1/inference/explain"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/explanation-example.png"))
    parser.add_argument("--class-name", default="Banana__Rotten")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    class_index = CLASS_NAMES.index(args.class_name)
    rgb = render(class_index, np.random.default_rng([args.seed, class_index]), (336, 448))
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    files = {"file": ("photo.jpg", jpeg.tobytes(), "image/jpeg")}
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(_env_file=None, data_dir=Path(data_dir))  # type: ignore[call-arg]
        token = mint_token(DEV_JWT_SECRET, "HS256", uuid.uuid4())
        headers = {"Authorization": f"Bearer {token}"}
        with TestClient(create_app(settings)) as client:
            while client.get("/health/ready").status_code != 200:
                pass
            answer = client.post(EXPLAIN, files=files, headers=headers).json()
            png = client.post(EXPLAIN, params={"format": "png"}, files=files, headers=headers)
            png.raise_for_status()
    overlay = cv2.cvtColor(cv2.imdecode(np.frombuffer(png.content, np.uint8), 1),
                           cv2.COLOR_BGR2RGB)
    side = np.concatenate([rgb, np.full((336, 8, 3), 255, np.uint8), overlay], axis=1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small = Image.fromarray(side).resize((side.shape[1] * 2 // 3, side.shape[0] * 2 // 3),
                                         Image.Resampling.LANCZOS)
    small.quantize(128).save(args.out, optimize=True)
    grid = np.array(answer["grid"])
    row, col = np.unravel_index(int(grid.argmax()), grid.shape)
    print(f"predicted {answer['predicted_class_name']} ({answer['confidence']:.3f}); "
          f"explained {answer['class_name']} versus {answer['versus']}; "
          f"peak cell row {row}, col {col} of {answer['rows']}x{answer['cols']}; "
          f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
