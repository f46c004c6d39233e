"""Shared fixtures and oracles of the model-level tests (hook layer, conformance, every method).

* fixtures: cached tiny random models (:func:`tiny`), left-padded request batches (:func:`batch`),
  the benchmark scripts as modules (:func:`load_script`);
* runs: :func:`patched_run` (logits, new tokens, stats, policies of a patched forward + generate);
* oracles: :func:`assert_batch_equals_alone` (a batch with left padding == each sample alone, the one
  copy every test uses), :func:`assert_sdpa_equals_eager`, :func:`assert_matches_shortened` (the
  unpatched model on the explicitly shortened input, ``tests/oracles.py``);
* independent references built from *eager* encoders and the pure kernels, never the adapter's
  recomputed signals: :func:`eager_clip`, :class:`qwen_eager_attention`, :func:`qwen_received`.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vtprune
from vtprune.policy import DecoderPolicy
from vtprune.testing import BUILDERS, QWEN3_FAMILIES, make_inputs, tiny_images

from oracles import last_logits, shortened_inputs

QUESTIONS = ["what is it?", "a longer question about the picture here?", "and the colour?"]
#: image sizes per family (None: the processor's fixed size)
SIZES = {
    "llava": None,
    "llava_dinov2": None,
    "llava_next": [(56, 56), (70, 112), (112, 84)],
    "qwen2_vl": [(56, 56), (70, 112), (112, 84)],
    "qwen2_5_vl": [(56, 56), (70, 112), (112, 84)],
    "llava_onevision": [(56, 56), (70, 112), (150, 160)],  # the last two canvases resized (anyres_max_2)
    "llava_onevision1_5": [(56, 56), (70, 112), (112, 84)],
    **{f: [(56, 56), (70, 112), (112, 84)] for f in QWEN3_FAMILIES},
}
#: larger Qwen images for the score-based selection tests (HiPrune, VisionZip, ToDRE): every image has
#: at least 12 merged tokens, so budgets, anchors and pivots have room
SCORE_SIZES = {
    **SIZES,
    "qwen2_vl": [(112, 112), (84, 112), (56, 84)],
    "qwen2_5_vl": [(112, 112), (84, 112), (56, 84)],
    "llava_onevision1_5": [(112, 112), (84, 112), (56, 84)],
    **{f: [(112, 112), (84, 112), (56, 84)] for f in QWEN3_FAMILIES},
}
GEN = dict(max_new_tokens=10, do_sample=False)
ATOL = dict(rtol=1e-5, atol=1e-5)


#: where the tiny models and their inputs live (``VTPRUNE_TEST_DEVICE=cuda``: scripts/gpu_check.sh)
DEVICE = torch.device(os.environ.get("VTPRUNE_TEST_DEVICE", "cpu"))


def load_script(name: str):
    """The module of ``scripts/<name>.py`` (scripts are not a package), executed fresh."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def tiny(family: str, attn: str = "sdpa"):
    """(model, processor) of the family's tiny random model, built once per session, on :data:`DEVICE`."""
    model, proc = BUILDERS[family](attn_implementation=attn)
    return model.to(DEVICE), proc


def vtprune_hooks(model) -> list:
    """Forward (pre-)hooks defined by vtprune code anywhere in the model (HF adds its own lazily)."""
    found = []
    for name, m in model.named_modules():
        for fn in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]:
            mod = getattr(fn, "__module__", "") or getattr(getattr(fn, "__func__", None), "__module__", "")
            if mod.startswith(("vtprune", "methods")):
                found.append((name, fn))
    return found


def no_vtprune_hooks(model) -> bool:
    """No vtprune hook and no vtprune attribute left on the model."""
    return not vtprune_hooks(model) and not any(
        k.startswith("_vtprune") or k == "_supports_mm_encoder_outputs" for k in vars(model))


def batch(family: str, n: int = 2, attn: str = "sdpa", first: int = 0, sizes: dict | None = None):
    """(model, processor outputs) of ``n`` prompts with images ``first .. first + n - 1`` (left padded)."""
    model, proc = tiny(family, attn)
    fam_sizes = (sizes or SIZES)[family]
    imgs = tiny_images(first + n, sizes=fam_sizes[: first + n] if fam_sizes else None)[first:]
    return model, make_inputs(family, proc, QUESTIONS[first : first + n], imgs).to(DEVICE)


def score_batch(family: str, n: int = 2, attn: str = "sdpa", first: int = 0):
    """:func:`batch` with :data:`SCORE_SIZES`."""
    return batch(family, n, attn, first, sizes=SCORE_SIZES)


def new_tokens(gen: torch.Tensor, n_prompt: int) -> list[list[int]]:
    return gen[:, n_prompt:].tolist()


def patched_run(model, inp, method, *, generate: bool = True, seed: int = 0, gen: dict = GEN, **params):
    """(last-position logits (fp32), generated new tokens or None, stats, policies) of a patched run."""
    with vtprune.patch(model, method, seed=seed, **params) as h:
        with torch.no_grad():
            logits = model(**inp).logits
            stats = h.stats
            out = model.generate(**inp, **gen) if generate else None
        policies = h.policies
    new = out[:, inp["input_ids"].shape[1]:] if out is not None else None
    return last_logits(logits), new, stats, policies


def layer_inputs(model, inp, layers, **kwargs) -> tuple[dict[int, torch.Tensor], object]:
    """``({layer: (B, L, D) hidden states decoder layer ``layer`` receives}, output)`` of an unpatched
    forward (``kwargs`` go to the model, e.g. ``output_attentions=True``). ``output.hidden_states[l]`` is
    layer ``l - 1``'s output, which on Qwen3-VL lacks the DeepStack level the model adds after it; this is
    what the layer really gets."""
    seen: dict[int, torch.Tensor] = {}
    decoder = model.model.language_model.layers

    def capture(module, args, kw, layer):
        if layer not in seen:  # the prefill (generate's later steps are ignored)
            seen[layer] = (args[0] if args else kw["hidden_states"]).clone()

    hooks = [decoder[l].register_forward_pre_hook(lambda m, a, k, l=l: capture(m, a, k, l), with_kwargs=True)
             for l in layers]
    try:
        with torch.no_grad():
            out = model(**inp, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


def recorded_views(policy) -> list:
    """Wrap ``policy.select`` (in place) to log ``(layer, view)`` of every call; returns the log."""
    seen: list = []
    select = policy.select

    def recording(layer, view, ctx):
        seen.append((layer, view))
        return select(layer, view, ctx)

    policy.select = recording
    return seen


def captured_features(model, inp, spec: str) -> list[torch.Tensor]:
    """The per-image features a patched prefill hands to the model (``mm_encoder_outputs``)."""
    cap = {}
    hook = model.model.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    try:
        with vtprune.patch(model, spec), torch.no_grad():
            model(**inp)
    finally:
        hook.remove()
    return list(cap["mm_encoder_outputs"]["image"].pooler_output)


def assert_matches_shortened(model, family, inp, logits, new_tokens, kept, features=None):
    """Patched logits / generated ids == the unpatched model on the explicitly shortened input."""
    positions = "original" if family.startswith("qwen") else "renumber"
    short = shortened_inputs(model, family, inp, kept, positions=positions)
    if features is not None:
        short["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=list(features))}
    with torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, **ATOL)
    if new_tokens is not None:
        assert torch.equal(new_tokens, gref)


def assert_inputs_batch_equals_alone(model, inp, singles: list, method, *, seed: int = 0, gen: dict = GEN,
                                     **params) -> None:
    """The batch oracle: ``inp`` (a left-padded batch) patched == each of ``singles`` (its samples, in
    order) patched alone: last logits, generated tokens, visual tokens and kept indices per image, and
    the per-layer visual-token schedule of each sample."""
    assert (inp["attention_mask"] == 0).any(), "the batch must contain left padding"
    logits, out, stats, _ = patched_run(model, inp, method, seed=seed, gen=gen, **params)
    assert len(singles) == inp["input_ids"].shape[0]
    for i, one in enumerate(singles):
        l1, o1, s1, _ = patched_run(model, one, method, seed=seed, gen=gen, **params)
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert out[i].tolist() == o1[0].tolist()
        assert s1.visual_tokens_per_image == [stats.visual_tokens_per_image[i]]
        assert torch.equal(stats.kept_index_per_image[i], s1.kept_index_per_image[0])
        assert s1.schedules[0].visual_tokens_per_layer == stats.schedules[i].visual_tokens_per_layer


def assert_batch_equals_alone(family: str, method, *, attn: str = "sdpa", n: int = 2, first: int = 0,
                              sizes: dict | None = None, **params) -> None:
    """:func:`assert_inputs_batch_equals_alone` on :func:`batch` fixtures (images ``first ..``)."""
    model, inp = batch(family, n, attn, first, sizes)
    singles = [batch(family, 1, attn, first + i, sizes)[1] for i in range(n)]
    assert_inputs_batch_equals_alone(model, inp, singles, method, **params)


def assert_sdpa_equals_eager(family: str, method, *, sizes: dict | None = None, **params) -> None:
    """The same kept tokens, logits (1e-4) and generated ids under SDPA and eager attention."""
    res = {}
    for attn in ("sdpa", "eager"):
        model, inp = batch(family, attn=attn, sizes=sizes)
        res[attn] = patched_run(model, inp, method, **params)
    (ls, gs, ss, _), (le, ge, se, _) = res["sdpa"], res["eager"]
    assert all(torch.equal(a, b) for a, b in zip(ss.kept_index_per_image, se.kept_index_per_image))
    torch.testing.assert_close(ls, le, rtol=1e-4, atol=1e-5)
    assert torch.equal(gs, ge)


def assert_int_keep_is_per_view_and_capped(method: str) -> None:
    """An int ``keep`` is a budget per view on LLaVA-NeXT (newlines kept outside it), and a budget above a
    view's tokens keeps them all, recorded as ``budget_clamped``."""
    from vtprune.methods._common import view_grids

    model, inp = batch("llava_next", 1)
    _, _, stats, _ = patched_run(model, inp, f"{method}:keep=12", generate=False)
    img = image_tokens(model, inp)[0]
    views = view_grids(img, "llava_next", method="test")
    assert stats.visual_tokens_per_image == [sum(min(12, g.index.numel()) for g in views)
                                             + int((~img.candidate).sum())]
    model, inp = batch("qwen2_vl", 1)
    _, _, stats, _ = patched_run(model, inp, f"{method}:keep=1000", generate=False)
    assert stats.visual_tokens_per_image == stats.visual_tokens_in_per_image  # capped: all kept
    assert stats.budget_clamped == [True]  # recorded: the view kept all its tokens


def image_tokens(model, inp, signals=()):
    """The adapter's per-image ``ImageTokens`` (layout only: view, candidate, grid)."""
    from vtprune.adapters import get_adapter
    from vtprune.policy import Context

    ad = get_adapter(model)
    with torch.no_grad():
        images, _ = ad.encode(dict(inp), {s: None for s in signals}, [], Context(family=ad.family))
    return images


# ---------------------------------------------------------------------------- eager references
def eager_clip(family: str, inp):
    """Eager CLIP run of every view: ``(hidden_states, attentions, keys)`` per layer.

    ``keys[l]``: (V, T, hd) head-mean ``k_proj`` outputs of layer ``l`` (captured with a hook).
    """
    model, _ = tiny(family, "eager")
    tower = model.model.vision_tower
    pv = inp["pixel_values"]
    if family == "llava_next":  # (B, P, 3, H, W) padded views -> the real views, in order
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = model.config
        n = [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                       patch_size=cfg.vision_config.image_size) for s in inp["image_sizes"]]
        pv = torch.cat([pv[i, : n[i]] for i in range(pv.shape[0])])
    keys = {}
    handles = []
    for l, layer in enumerate(getattr(tower, "vision_model", tower).encoder.layers):
        attn = layer.self_attn

        def hook(m, a, out, l=l, attn=attn):
            v, t, _ = out.shape
            keys[l] = out.view(v, t, attn.num_heads, -1).float().mean(2)
        handles.append(attn.k_proj.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = tower(pv, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out.hidden_states, out.attentions, keys


class qwen_eager_attention:
    """Context manager: record the eager attention weights of every Qwen vision block.

    ``weights[b]``: list of (H, T, T) probabilities per attention segment, in packed order.
    """

    def __init__(self, model):
        self.model = model
        self.mod = sys.modules[type(model.model.visual.blocks[0].attn).__module__]
        self.block_of = {blk.attn: i for i, blk in enumerate(model.model.visual.blocks)}
        self.weights: dict[int, list[torch.Tensor]] = {}

    def __enter__(self):
        self.orig = self.mod.eager_attention_forward

        def wrapped(module, *args, **kwargs):
            out = self.orig(module, *args, **kwargs)
            if module in self.block_of:
                self.weights.setdefault(self.block_of[module], []).append(out[1][0].float())
            return out
        self.mod.eager_attention_forward = wrapped
        return self

    def __exit__(self, *exc):
        self.mod.eager_attention_forward = self.orig


def qwen_received(family: str, inp, block: int) -> list[torch.Tensor]:
    """Per image, the attention each merged token receives in ``block`` (raster order), from eager
    weights and the pure kernels (HiPrune's reduction)."""
    from vtprune.methods.hiprune import attention_received, merge_unit_scores

    model, _ = tiny(family, "eager")
    with qwen_eager_attention(model) as rec, torch.no_grad():
        model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    s_patch = torch.cat([attention_received(w, family="qwen") for w in rec.weights[block]])
    widx = None
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        vc = model.config.vision_config
        widx, _ = get_vision_window_index(inp["image_grid_thw"], vc.spatial_merge_size, vc.window_size, vc.patch_size)
    units = merge_unit_scores(s_patch, widx)
    sizes = [int(t * h * w) // 4 for t, h, w in inp["image_grid_thw"].tolist()]
    return list(units.split(sizes))


def image_features(family: str, inp) -> list[torch.Tensor]:
    """The unpatched model's per-image features (``oracles.image_features`` on the cached tiny model)."""
    from oracles import image_features as feats

    model, _ = tiny(family)
    with torch.no_grad():
        return feats(model, family, inp)


@dataclass
class SignalRecorder(DecoderPolicy):
    """Keeps every visual token at ``layer``; records the requested signals of each sample's view
    (``kinds``: layer -> signal kinds, as ``signal_layers`` returns them)."""

    name: ClassVar[str] = "signal_recorder"
    layer: int = 2
    keep: float = 1.0
    kinds: dict = field(default_factory=dict)
    seen: list = field(default_factory=list)

    def signal_layers(self, num_layers):
        return self.kinds

    def select(self, layer, view, ctx):
        self.seen.append({k: v.clone() for k, v in view.signals.items()})
        return torch.nonzero(view.visual).flatten()
