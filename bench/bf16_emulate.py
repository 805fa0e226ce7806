"""Estimate what bf16 does to a model's outputs on a CPU without bf16 (emulated in ONNX Runtime).

    python bench/bf16_emulate.py --onnx MODEL_CACHE_DIR/<sha256>-tf2onnx-opset17-v1.onnx

AMX / AVX512-BF16 convolutions and matrix products read bf16 activations and weights and
accumulate in fp32. This rewrites the ONNX model so that every Conv / MatMul / Gemm input is
rounded to bf16 (weights rounded to nearest even; activations through Cast to BFLOAT16 and
back), runs it and the original in ONNX Runtime, and reports top-1 agreement and the max abs
softmax difference on the agreement check's probe images (runtime_select.probe_images) and on
real photographs (scikit-image samples). OpenVINO's bf16 also keeps element-wise work in bf16,
so real bf16 deviates at least this much. Calibration: for the bundled demo model this gives
0.017 on photographs; the issue's bake-off measured 0.019 with real bf16 on an AMX Xeon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rottenbot_inference.inference.runtime_select import probe_images


def bf16_round(values: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 value (ties to even), as float32."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def emulate(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = []
    for count, node in enumerate(list(graph.node)):
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            for index, name in enumerate(list(node.input[:2])):
                tensor = initializers.get(name)
                if tensor is not None:
                    values = numpy_helper.to_array(tensor)
                    if values.dtype == np.float32:
                        tensor.CopyFrom(numpy_helper.from_array(bf16_round(values), name))
                    continue
                low, back = f"{name}__bf16_{count}", f"{name}__f32_{count}"
                nodes.append(helper.make_node("Cast", [name], [low], to=TensorProto.BFLOAT16))
                nodes.append(helper.make_node("Cast", [low], [back], to=TensorProto.FLOAT))
                node.input[index] = back
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--photos", type=int, default=64)
    args = parser.parse_args()
    reference = ort.InferenceSession(str(args.onnx), providers=["CPUExecutionProvider"])
    emulated = ort.InferenceSession(
        emulate(onnx.load(args.onnx)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    name = reference.get_inputs()[0].name
    shape = tuple(int(d) for d in reference.get_inputs()[0].shape[1:])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from build_production_model import sample_photos

    sets = {
        "probe images": probe_images(shape),  # type: ignore[arg-type]
        "photographs": sample_photos(args.photos, shape[0]).astype(np.float32),
    }
    for label, images in sets.items():
        expected = reference.run(None, {name: images})[0]
        got = emulated.run(None, {name: images})[0]
        same = (expected.argmax(1) == got.argmax(1)).mean()
        print(
            f"{label:>12} ({len(images)}): top-1 identical {100 * same:.1f} %, max abs softmax "
            f"difference {np.abs(expected - got).max():.3f} (largest fp32 probability "
            f"{expected.max():.3f})"
        )


if __name__ == "__main__":
    main()
