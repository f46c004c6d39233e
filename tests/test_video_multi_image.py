"""Video and several images per sample on the Qwen families, per-frame / per-video quotas, and the
Qwen3-specific rules (DeepStack rows, video timestamps, attention rows of hybrid Qwen3.5 LLMs).

Oracles as in test_hook_layer: keep-all == unpatched; stage P == the explicitly shortened input (kept
image *and* video features, original M-RoPE positions); stage D == the mask run, or the physically
shortened run on hybrid LLMs; a left-padded batch == each sample alone.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.policy import TokenPolicy
from vtprune.policy import split_proportional
from vtprune.testing import BUILDERS, make_inputs, make_video_inputs, tiny_images, tiny_video

from oracles import last_logits, set_features, shortened_inputs, stage_d_reference

VIDEO_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
QUESTIONS = ["what happens?", "a longer question about what happens here?"]
# video 0: 2 temporal patches of 2x3 merged tokens, video 1: 3 of 3x2; images 2x4 and 2x2
VIDEOS = [(4, 56, 84), (6, 84, 56)]
IMAGES = [(70, 112), (56, 56)]
GEN = dict(max_new_tokens=8, do_sample=False)


@functools.lru_cache(maxsize=None)
def _model(family: str):
    return BUILDERS[family]()


def _inputs(family: str, idx=(0, 1), with_images: bool = True):
    model, proc = _model(family)
    vids = [tiny_video(VIDEOS[i][0], i, VIDEOS[i][1:]) for i in idx]
    imgs = [tiny_images(2, sizes=IMAGES)[i] for i in idx] if with_images else None
    return model, make_video_inputs(family, proc, [QUESTIONS[i] for i in idx], vids, images=imgs, fps=4.0)


def _run(model, inp, spec, seed=3):
    """Patched last logits, generated ids, stats and the features handed to the model (images, videos)."""
    cap = {}

    def grab(m, a, k):
        if k.get("mm_encoder_outputs") and "enc" not in cap:
            cap["enc"] = k["mm_encoder_outputs"]

    hook = model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtprune.patch(model, spec, seed=seed) as h, torch.no_grad():
            logits = last_logits(model(**inp).logits)
            gen = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    finally:
        hook.remove()
    enc = cap["enc"]
    feats = [f for m in ("image", "video") if m in enc for f in enc[m].pooler_output]
    return logits, gen, h.stats, feats


# ------------------------------------------------------------------ oracles with video
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_keep_all_equals_unpatched(family):
    model, inp = _inputs(family)
    with torch.no_grad():
        ref = last_logits(model(**inp).logits)
        gref = model.generate(**inp, **GEN)[:, inp["input_ids"].shape[1]:]
    logits, gen, stats, _ = _run(model, inp, "none")
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    # images first, then videos: 8 + 4 image tokens, 2*6 and 3*6 video tokens
    assert stats.visual_tokens_in_per_image == [8, 4, 12, 18]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("spec", ["random:keep=0.5,quota=frame", "random:keep=4,quota=video", "pool:keep=0.5"])
def test_video_stage_p_equals_shortened_input(family, spec):
    model, inp = _inputs(family)
    logits, gen, stats, feats = _run(model, inp, spec)
    assert sum(stats.visual_tokens_per_image) < sum(stats.visual_tokens_in_per_image)
    short = shortened_inputs(model, family, inp, stats.kept_index_per_image, positions="original")
    set_features(short, feats)  # pool merges: its features through the slow path
    with torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_stage_d_equals_reference_run(family):
    model, inp = _inputs(family)
    logits, gen, stats, _ = _run(model, inp, "fastv:layer=2,keep=0.3")
    idx = stats.llm_kept_index
    keep = torch.zeros_like(inp["attention_mask"], dtype=torch.bool)
    for b in range(idx.shape[0]):
        keep[b, idx[b][idx[b] >= 0]] = True
    ref, gref = stage_d_reference(model, family, inp, 2, keep, GEN["max_new_tokens"])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("spec", ["random:keep=0.5,quota=frame", "fastv:layer=2,keep=0.5"])
def test_video_batch_equals_each_alone(family, spec):
    model, inp = _inputs(family)
    assert (inp["attention_mask"] == 0).any()
    logits, gen, stats, _ = _run(model, inp, spec)
    for i in range(2):
        _, one = _inputs(family, idx=(i,))
        l1, g1, s1, _ = _run(model, one, spec)
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert gen[i].tolist() == g1[0].tolist()
        assert s1.schedules[0].visual_tokens_per_layer == stats.schedules[i].visual_tokens_per_layer


# ------------------------------------------------------------------ quotas
@dataclass
class _FirstTokens(TokenPolicy):
    """Keeps the first candidates in token order: shows which tokens the budget can reach."""

    name = "first-tokens-test"
    keep: int | float = 0.5

    def select(self, image, n_keep, ctx):
        return image.candidate_index()[:n_keep]


def _per_frame(kept: torch.Tensor, frame_tokens: int, frames: int) -> list[int]:
    return torch.bincount(kept // frame_tokens, minlength=frames).tolist()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_quota_frame_gives_each_frame_its_share_and_video_ranks_jointly(family):
    model, inp = _inputs(family, with_images=False)
    got = {}
    for quota in ("frame", "video"):
        with vtprune.patch(model, _FirstTokens(keep=0.5, quota=quota)) as h, torch.no_grad():
            model(**inp)
        got[quota] = [_per_frame(k, 6, n) for k, n in zip(h.stats.kept_index_per_image, (2, 3))]
        assert h.stats.visual_tokens_per_image == [6, 9]
    assert got["frame"] == [[3, 3], [3, 3, 3]]  # each frame keeps half of itself
    assert got["video"] == [[6, 0], [6, 3, 0]]  # one ranking over the whole video


def test_quota_int_budget_is_split_over_frames():
    assert split_proportional(5, [6, 6, 6]) == [2, 2, 1]
    assert split_proportional(9, [6, 6, 6]) == [3, 3, 3]
    assert split_proportional(3, [1, 1, 8]) == [1, 1, 1]
    model, inp = _inputs("qwen2_vl", with_images=False)
    with vtprune.patch(model, _FirstTokens(keep=5, quota="frame")) as h, torch.no_grad():
        model(**inp)
    assert [_per_frame(k, 6, n) for k, n in zip(h.stats.kept_index_per_image, (2, 3))] == [[3, 2], [2, 2, 1]]
    with pytest.raises(ValueError, match="cannot give each of the 3 frames a token; use quota='video'"):
        with vtprune.patch(model, _FirstTokens(keep=2, quota="frame")), torch.no_grad():
            model(**inp)


def test_bad_quota_is_refused():
    model, _ = _inputs("qwen2_vl")
    with pytest.raises(ValueError, match=r"quota='clip'; choose one of \('video', 'frame'\)"):
        vtprune.patch(model, "random:keep=0.5,quota=clip")
    assert not hasattr(model, "_vtprune_patch")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_5"])
def test_video_tokens_are_counted_in_stats_and_flops(family):
    from vtprune.flops import count_flops

    model, inp = _inputs(family, with_images=False)
    with vtprune.patch(model, "random:keep=0.5,quota=frame") as h, torch.no_grad():
        model(**inp)
    s = h.stats.schedules[1]  # 3 temporal patches of 6 tokens
    assert s.visual_tokens_in == 18 and s.visual_tokens_per_image == [9]
    assert s.visual_tokens_per_layer == [9] * 4
    assert s.projector_tokens == 18
    assert s.vision_tokens_per_layer == [[3 * 6 * 4] * len(model.model.visual.blocks)]  # t*h*w patches
    from vtprune.adapters import get_adapter

    full_block = get_adapter(model).full_attention_blocks()[0]
    assert sorted(s.vision_windows[full_block]) == [24, 24, 24]  # attention within each temporal patch
    with vtprune.patch(model, "none") as h0, torch.no_grad():
        model(**inp)
    full, pruned = count_flops(model, h0.stats.schedules[1]), count_flops(model, s)
    assert pruned.vision_flops == full.vision_flops > 0
    assert pruned.llm_prefill_flops < full.llm_prefill_flops


# ------------------------------------------------------------------ timestamps (Qwen3-VL, Qwen3.5)
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_video_timestamps_keep_their_tokens_and_positions(family):
    model, inp = _inputs(family, with_images=False)
    cap = {}
    hook = model.model.register_forward_pre_hook(
        lambda m, a, k: cap.setdefault("kw", dict(k)) and None, with_kwargs=True)
    with vtprune.patch(model, "random:keep=0.25,quota=video"), torch.no_grad():
        model(**inp)
    hook.remove()
    ids, mask = inp["input_ids"], inp["attention_mask"].bool()
    from oracles import full_positions

    pos = full_positions(model, family, inp)
    new_ids, new_mask, new_pos = cap["kw"]["input_ids"], cap["kw"]["attention_mask"].bool(), cap["kw"]["position_ids"]
    video = model.config.video_token_id
    for b in range(ids.shape[0]):
        text = mask[b] & (ids[b] != video)
        text_new = new_mask[b] & (new_ids[b] != video)
        assert ids[b, text].tolist() == new_ids[b, text_new].tolist()  # every timestamp / text token kept
        assert "seconds>" in _model(family)[1].tokenizer.decode(new_ids[b, text_new])
        torch.testing.assert_close(new_pos[-3:, b][:, text_new], pos[:, b][:, text])  # at its own position


# ------------------------------------------------------------------ several images per sample
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_several_images_per_prompt_have_per_image_quotas(family):
    model, proc = _model(family)
    sizes = [(56, 56), (70, 112), (112, 84), (56, 84)]
    imgs = tiny_images(4, sizes=sizes)
    inp = make_inputs(family, proc, QUESTIONS, [imgs[:2], imgs[2:]])
    logits, gen, stats, _ = _run(model, inp, "random:keep=0.5")
    assert stats.visual_tokens_in_per_image == [4, 8, 12, 6]
    assert stats.visual_tokens_per_image == [2, 4, 6, 3]  # each image keeps its own half
    assert [s.visual_tokens_per_image for s in stats.schedules] == [[2, 4], [6, 3]]
    short = shortened_inputs(model, family, inp, stats.kept_index_per_image, positions="original")
    with torch.no_grad():
        ref = last_logits(model(**short).logits)
        gref = model.generate(**short, **GEN)[:, short["input_ids"].shape[1]:]
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, gref)
    for i in range(2):  # == each sample alone
        one = make_inputs(family, proc, [QUESTIONS[i]], [imgs[2 * i : 2 * i + 2]])
        l1, g1, _, _ = _run(model, one, "random:keep=0.5")
        torch.testing.assert_close(logits[i : i + 1], l1, rtol=1e-4, atol=1e-5)
        assert gen[i].tolist() == g1[0].tolist()


# ------------------------------------------------------------------ DeepStack (Qwen3-VL)
def test_deepstack_features_matter_and_follow_the_kept_tokens():
    """The shortened-input oracle hands every DeepStack level the kept rows; dropping them (zeros)
    changes the output, so stage-P equality really checks the DeepStack rows too."""
    family = "qwen3_vl"
    model, proc = _model(family)
    inp = make_inputs(family, proc, QUESTIONS, tiny_images(2, sizes=IMAGES))
    logits, _, stats, _ = _run(model, inp, "random:keep=0.5")
    short = shortened_inputs(model, family, inp, stats.kept_index_per_image, positions="original")
    with torch.no_grad():
        torch.testing.assert_close(logits, last_logits(model(**short).logits), rtol=1e-5, atol=1e-5)
        enc = short["mm_encoder_outputs"]["image"]
        enc.deepstack_features = [[torch.zeros_like(x) for x in lvl] for lvl in enc.deepstack_features]
        assert not torch.allclose(logits, last_logits(model(**short).logits), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ attention rows of hybrid LLMs
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_recomputed_attention_rows_equal_eager_attention(family):
    """q/k norms, Qwen3.5's gated q_proj and partial rotary: the recomputed last-token row of every
    full-attention layer equals output_attentions of an eager run."""
    from vtprune.adapters import get_adapter

    model, proc = BUILDERS[family](attn_implementation="eager")
    inp = make_inputs(family, proc, QUESTIONS[:1], tiny_images(1, sizes=IMAGES))
    adapter = get_adapter(model)
    types = getattr(model.config.text_config, "layer_types", None) or ["full_attention"] * 4
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    rows = {}
    hooks = []
    for i in full:
        def pre(m, args, kwargs, i=i):
            h = args[0] if args else kwargs["hidden_states"]
            r = torch.full((h.shape[0], 1), h.shape[1] - 1)
            rows[i] = adapter.llm_attention_rows(i, h, kwargs["position_embeddings"], r, None)
        hooks.append(adapter.llm_layers()[i].register_forward_pre_hook(pre, with_kwargs=True))
    with torch.no_grad():
        out = model(**inp, output_attentions=True)
    for h in hooks:
        h.remove()
    assert len(out.attentions) == len(full)  # only full-attention layers have attention maps
    for att, i in zip(out.attentions, full):
        torch.testing.assert_close(rows[i], att[:, :, -1:].float(), rtol=1e-5, atol=1e-6)


def test_hybrid_attention_rows_come_from_the_last_full_attention_layer():
    """Tiny Qwen3.5 layers: [linear, full, linear, full]. FastV K=3 asks for layer 2's row (linear):
    it reads layer 1's, so it keeps exactly what FastV K=2 keeps; K=1 asks for layer 0: no full layer."""
    model, proc = _model("qwen3_5")
    inp = make_inputs("qwen3_5", proc, QUESTIONS, tiny_images(2, sizes=IMAGES))
    kept = {}
    for k in (2, 3):
        with vtprune.patch(model, f"fastv:layer={k},keep=0.5") as h, torch.no_grad():
            model(**inp)
        kept[k] = h.stats.llm_kept_index
    assert torch.equal(kept[2], kept[3])
    with pytest.raises(ValueError, match="first full-attention layer is 1.*FastV layer >= 2"):
        vtprune.patch(model, "fastv:layer=1,keep=0.5")
    assert not hasattr(model, "_vtprune_patch")


def test_released_qwen3_5_layout_needs_fastv_layer_4():
    """Full attention every 4th layer (the released models): FastV K=2 has no attention row to read."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    small, _ = _model("qwen3_5")
    cfg = Qwen3_5Config(text_config={**small.config.text_config.to_dict(), "layer_types": None,
                                     "num_hidden_layers": 8},
                        vision_config=small.config.vision_config.to_dict(),
                        image_token_id=small.config.image_token_id, video_token_id=small.config.video_token_id)
    model = Qwen3_5ForConditionalGeneration(cfg).eval()
    assert model.config.text_config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]
    with pytest.raises(ValueError, match="first full-attention layer is 3.*FastV layer >= 4"):
        vtprune.patch(model, "fastv")  # default K=2
    with pytest.raises(ValueError, match="first full-attention layer is 3"):
        vtprune.patch(model, "todre-relevance:relevance_layer=2")
    with pytest.raises(ValueError, match=r"dart: .*\(the first is 3\): use layer >= 4"):
        vtprune.patch(model, "dart")  # default K=2: keys of layer 1
    with pytest.raises(ValueError, match=r"sparsevlm: ranking layer 2 has no attention rows.*layers=3"):
        vtprune.patch(model, "sparsevlm:layers=2|4|5,schedule=3|2|1")
    vtprune.patch(model, "fastv:layer=4,keep=0.5").remove()
    vtprune.patch(model, "transprune:prune_layers=4|5|6,keep_ratios=0.75|0.5|0.25").remove()
    vtprune.patch(model, "dart:layer=4").remove()
    vtprune.patch(model, "sparsevlm:layers=3|5,schedule=3|2,recycle=False").remove()  # rows of 3 and 3


# ------------------------------------------------------------------ the demo
@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5_moe"])
def test_demo_runs_on_the_new_families(family, capsys):
    from vtprune.eval.cli import main

    assert main(["demo", "--family", family, "--new-tokens", "3"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line[:1].isalpha()}
    assert rows["none"][-2] == "True"  # keep-all generates the vanilla ids
    assert {"random:keep=0.5", "pool:keep=0.25", "fastv:layer=2,keep=0.5"} <= set(rows)
