"""Tests of vtprune.flops: reference values of the FLOPs conventions and FlopCounterMode on tiny random models."""
from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2Model,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    SiglipVisionConfig,
)

from vtprune.flops import (
    CONVENTION,
    count_flops,
    llm_dims,
    nominal_schedule,
    prune_schedule,
    qwen_vision_segments,
)
from vtprune.schedule import TokenSchedule

torch.set_num_threads(1)

# CPU SDPA has no flop formula in torch; without it attention FLOPs are silently missing.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def measured(fn) -> int:
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def close(counted: float, expected: float, rel: float = 0.01) -> bool:
    return abs(counted - expected) <= rel * expected


# ------------------------------------------------------------------------------- real configs (§6)
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
VICUNA7 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32064)
VICUNA13 = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000)
QWEN7_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064)
QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[7, 15, 23, 31])
QWEN2_VIT = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2)


@pytest.fixture(scope="module")
def llava7():
    return LlavaConfig(vision_config=CLIPVisionConfig(**CLIP_L336), text_config=LlamaConfig(**VICUNA7))


@pytest.fixture(scope="module")
def base7(llava7):
    return nominal_schedule(llava7, 576, 40, 35)


TRANSPRUNE_HIGH = {7: 504, 9: 360, 12: 72}


def test_llava7_vanilla(llava7, base7):
    assert base7.prompt_tokens == 651 and len(base7.llm_tokens_per_layer) == 32
    r = count_flops(llava7, base7)
    d = r.as_dict()
    assert d["llm_prefill_tflops"] == pytest.approx(8.654, abs=5e-4)
    assert d["fastv_ratio"] == pytest.approx(1.0)
    assert d["eq_visual_tokens"] == 576
    assert d["kv_mib"] == pytest.approx(325.5, abs=0.05)
    assert d["paper_tflops"]["pdrop_visual_mac"] == pytest.approx(3.817, abs=5e-4)
    assert d["vision_tflops"] * 1e3 == pytest.approx(381.9, abs=0.05)  # CLIP ViT-L/14-336, one view
    assert d["projector_tflops"] * 1e3 == pytest.approx(24.2, abs=0.05)
    assert d["decode_gflops_per_token"] == pytest.approx(13.29, abs=5e-3)
    assert d["lm_head_gflops_per_token"] == pytest.approx(2 * 4096 * 32064 / 1e9)
    assert d["convention"] == CONVENTION
    assert len(d["llm_prefill_gflops_per_layer"]) == 32
    assert sum(r.llm_prefill_per_layer) == pytest.approx(r.llm_prefill_flops)


@pytest.mark.parametrize("keep,tflops,kv", [(192, 3.496, None), (128, 2.651, None), (64, 1.810, 69.5)])
def test_llava7_pre_llm(llava7, base7, keep, tflops, kv):
    r = count_flops(llava7, prune_schedule(base7, {0: keep})).as_dict()
    assert r["llm_prefill_tflops"] == pytest.approx(tflops, abs=5e-4)
    assert r["eq_visual_tokens"] == keep
    if kv is not None:
        assert r["kv_mib"] == pytest.approx(kv, abs=0.05)


@pytest.mark.parametrize(
    "steps,tflops,ratio,eq,kv,pdrop",
    [
        ({2: 288}, 5.013, 0.578, 306, 190.5, 2.007),  # FastV K=2 R=50%
        ({2: 144}, 3.224, 0.371, 171, None, 1.118),  # FastV K=2 R=75%
        ({3: 288}, 5.135, 0.592, 315, None, None),  # FastV K=3 R=50%
        (TRANSPRUNE_HIGH, 4.107, 0.474, 236.25, 155.6, 1.557),
    ],
)
def test_llava7_in_llm(llava7, base7, steps, tflops, ratio, eq, kv, pdrop):
    r = count_flops(llava7, prune_schedule(base7, steps)).as_dict()
    assert r["llm_prefill_tflops"] == pytest.approx(tflops, abs=5e-4)
    assert r["fastv_ratio"] == pytest.approx(ratio, abs=5e-4)
    assert r["eq_visual_tokens"] == pytest.approx(eq)
    if kv is not None:
        assert r["kv_mib"] == pytest.approx(kv, abs=0.05)
    if pdrop is not None:
        assert r["paper_tflops"]["pdrop_visual_mac"] == pytest.approx(pdrop, abs=5e-4)
        assert r["paper_tflops"]["llmviewer_visual"] == pytest.approx(2 * r["paper_tflops"]["pdrop_visual_mac"])


def test_fastv_readme_ratio(llava7):
    # FastV README "FLOPS = 57 %" (K=3, R=50 %) with n = 35 + 576 and no text (fastv_ratio)
    s = prune_schedule(nominal_schedule(llava7, 576, 0, 35), {3: 288})
    assert count_flops(llava7, s).fastv_ratio == pytest.approx(0.566, abs=5e-4)


def test_decode_first_step(llava7, base7):
    r0 = count_flops(llava7, base7)
    r64 = count_flops(llava7, prune_schedule(base7, {0: 64}))
    assert r0.decode_flops_first / 1e9 == pytest.approx(13.29, abs=5e-3)
    assert r64.decode_flops_first / 1e9 == pytest.approx(13.03, abs=5e-3)


def test_decode_mean_and_kv_end(llava7, base7):
    dims = llm_dims(llava7)
    s = prune_schedule(base7, {0: 64})
    s.new_tokens = 11  # 10 decode steps, caches n+1 ... n+10
    r = count_flops(llava7, s)
    per_token_cache = 2 * 2 * dims.d_q * dims.layers  # FLOPs per extra cached token, all layers
    assert r.decode_flops_mean - r.decode_flops_first == pytest.approx(4.5 * per_token_cache)
    kv_tok = 2 * dims.kv_heads * dims.head_dim * 2 * dims.layers
    assert r.kv_bytes_end - r.kv_bytes_prefill == 10 * kv_tok
    assert kv_tok == 512 * 1024  # Vicuna-7B: 512 KiB per token
    s.new_tokens = 1
    r1 = count_flops(llava7, s)
    assert r1.decode_flops_mean == r1.decode_flops_first and r1.kv_bytes_end == r1.kv_bytes_prefill


def test_llava_next_paper_conventions():
    nx7 = LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP_L336), text_config=LlamaConfig(**VICUNA7))
    nx13 = LlavaNextConfig(vision_config=CLIPVisionConfig(**CLIP_L336), text_config=LlamaConfig(**VICUNA13))

    def paper(cfg, s):
        return count_flops(cfg, s).as_dict()["paper_tflops"]

    s = nominal_schedule(nx7, 2880, 0)
    assert paper(nx7, s)["pdrop_visual_mac"] == pytest.approx(20.825, abs=5e-4)
    assert paper(nx7, s)["llmviewer_visual"] == pytest.approx(41.7, abs=0.05)
    assert paper(nx7, nominal_schedule(nx7, 720, 0))["llmviewer_visual"] == pytest.approx(9.6, abs=0.05)
    assert paper(nx7, nominal_schedule(nx7, 288, 0))["llmviewer_visual"] == pytest.approx(3.8, abs=0.05)
    assert paper(nx13, nominal_schedule(nx13, 2880, 0))["llmviewer_visual"] == pytest.approx(79.9, abs=0.05)
    tp = prune_schedule(s, {7: 2520, 9: 1800, 12: 360})  # TransPrune-High ratios on NeXT
    assert paper(nx7, tp)["pdrop_visual_mac"] / paper(nx7, s)["pdrop_visual_mac"] == pytest.approx(0.400, abs=5e-4)
    # 5 views of CLIP ViT-L/14-336: 1.91 TFLOPs
    assert len(s.vision_tokens_per_layer) == 5
    assert count_flops(nx7, s).as_dict()["vision_tflops"] == pytest.approx(1.91, abs=5e-3)


def test_qwen25_vl_7b():
    q = Qwen2_5_VLConfig(text_config=QWEN7_TEXT, vision_config=QWEN25_VIT)
    s = nominal_schedule(q, 1024, 25, 15)  # one 896x896 image: 64x64 patches
    assert s.vision_tokens_per_layer == [[4096] * 32] and s.projector_tokens == 1024
    windows = s.vision_windows
    assert windows[7] == [4096] and windows[0] == [64] * 64  # 8x8-patch windows of 112 px
    d = count_flops(q, s).as_dict()
    assert d["llm_prefill_tflops"] == pytest.approx(14.34, abs=5e-3)
    assert d["kv_mib"] == pytest.approx(58.2, abs=0.05)
    assert d["projector_tflops"] == pytest.approx(0.09, abs=5e-3)
    assert d["vision_tflops"] + d["projector_tflops"] == pytest.approx(5.65, abs=5e-3)
    # without windows: full attention in every block (more expensive)
    s_full = nominal_schedule(q, 1024, 25, 15)
    s_full.vision_windows = []
    assert count_flops(q, s_full).vision_flops > count_flops(q, s).vision_flops + 0.3e12


def test_qwen2_vl_7b_vit():
    q = Qwen2VLConfig(text_config=QWEN7_TEXT, vision_config=QWEN2_VIT)
    d = count_flops(q, nominal_schedule(q, 1024, 25, 15)).as_dict()
    assert d["vision_tflops"] + d["projector_tflops"] == pytest.approx(8.01, abs=5e-3)
    assert d["llm_prefill_tflops"] == pytest.approx(14.34, abs=5e-3)


@pytest.mark.parametrize(
    "text,kib",
    [
        (VICUNA13, 800),
        (QWEN7_TEXT, 56),
        (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
              num_key_value_heads=2, vocab_size=151936), 36),
        (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, vocab_size=151936), 28),
    ],
)
def test_kv_per_token(text, kib):
    cfg = Qwen2Config(**text)
    r = count_flops(cfg, nominal_schedule(cfg, 0, 1))
    assert r.kv_bytes_prefill == kib * 1024
    assert r.vision_flops == 0 and r.projector_flops == 0


def test_model_argument_and_validation(llava7):
    tiny = LlamaModel(_tiny_llama(layers=2))
    s = nominal_schedule(tiny, 4, 3)
    assert count_flops(tiny, s).llm_prefill_flops == count_flops(tiny.config, s).llm_prefill_flops
    with pytest.raises(ValueError):
        count_flops(llava7, TokenSchedule(llm_tokens_per_layer=[10] * 3))


# ---------------------------------------------------------------------- tiny models vs FlopCounterMode
def _tiny_llama(layers=2, **kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, **kw)


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=56, patch_size=14)
TINY_QWEN_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, bos_token_id=None, eos_token_id=None,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})


def _tiny_llava():
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**TINY_CLIP), text_config=_tiny_llama(), image_token_index=299,
                      image_seq_length=16)
    return LlavaForConditionalGeneration(cfg).eval()


def _tiny_llava_next():
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TINY_CLIP), text_config=_tiny_llama(),
                          image_token_index=299, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    return LlavaNextForConditionalGeneration(cfg).eval()


def _tiny_qwen2_vl():
    cfg = Qwen2VLConfig(text_config=TINY_QWEN_TEXT,
                        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=4, num_heads=4,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(cfg).eval()


def _tiny_qwen25_vl():
    cfg = Qwen2_5_VLConfig(text_config=TINY_QWEN_TEXT,
                           vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                                              out_hidden_size=64, window_size=112, patch_size=14,
                                              spatial_merge_size=2, temporal_patch_size=2,
                                              fullatt_block_indexes=[1]))
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


FAMILIES = {"llava": _tiny_llava, "llava_next": _tiny_llava_next, "qwen2_vl": _tiny_qwen2_vl,
            "qwen2_5_vl": _tiny_qwen25_vl}


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    torch.manual_seed(0)
    return FAMILIES[request.param]()


def _embeds(model, n):
    return torch.randn(1, n, model.config.text_config.hidden_size)


def test_tiny_llm_prefill(tiny):
    lm = tiny.model.language_model
    n = 37
    s = nominal_schedule(tiny.config, 16, n - 16, image_grid_thw=[(1, 8, 8)])
    assert s.prompt_tokens == n
    got = measured(lambda: lm(inputs_embeds=_embeds(tiny, n), use_cache=False))
    assert close(got, count_flops(tiny, s).llm_prefill_flops)


def test_tiny_llm_decode_step(tiny):
    lm = tiny.model.language_model
    n = 29
    with torch.no_grad():
        out = lm(inputs_embeds=_embeds(tiny, n), use_cache=True)
    cache = out.cache
    got = measured(lambda: lm(inputs_embeds=_embeds(tiny, 1), cache=cache, use_cache=True))
    s = nominal_schedule(tiny.config, 10, n - 10, image_grid_thw=[(1, 4, 10)])
    r = count_flops(tiny, s)
    assert close(got, r.decode_flops_first)
    # the LM head is reported separately
    head = measured(lambda: tiny.lm_head(torch.randn(1, 1, tiny.config.text_config.hidden_size)))
    assert head == r.lm_head_flops_per_token


def test_tiny_vision_and_projector(tiny):
    cfg = tiny.config
    torch.manual_seed(1)
    if cfg.model_type in ("llava", "llava_next"):
        views = 1 if cfg.model_type == "llava" else 5
        s = nominal_schedule(cfg, 16 * views, 5, views=views)
        assert s.vision_tokens_per_layer == [[17] * 3] * views
        px = torch.randn(views, 3, 56, 56)
        vis = measured(lambda: tiny.model.vision_tower(px))
        proj = measured(lambda: tiny.model.multi_modal_projector(torch.randn(1, s.projector_tokens, 32)))
    else:
        grid = [(1, 12, 20), (2, 8, 8)]  # 6x10 merged: edge windows; plus a 2-frame video
        s = nominal_schedule(cfg, (240 + 128) // 4, 5, image_grid_thw=grid)
        assert len(s.vision_tokens_per_layer) == 3 and s.projector_tokens == 92
        px = torch.randn(240 + 128, 3 * 2 * 14 * 14)
        thw = torch.tensor(grid)
        both = measured(lambda: tiny.model.visual(px, grid_thw=thw))
        vc = cfg.vision_config
        c = vc.hidden_size if cfg.model_type == "qwen2_5_vl" else vc.embed_dim
        proj = measured(lambda: tiny.model.visual.merger(torch.randn(240 + 128, c)))
        vis = both - proj
    r = count_flops(tiny, s)
    assert close(vis, r.vision_flops)
    assert close(proj, r.projector_flops)


def test_qwen25_segments_match_transformers():
    from transformers.vision_utils import get_vision_window_index

    cfg = _tiny_qwen25_vl().config
    grid = [(1, 12, 20), (2, 8, 8), (1, 18, 6)]
    vc = cfg.vision_config
    _, cu = get_vision_window_index(torch.tensor(grid), spatial_merge_size=vc.spatial_merge_size,
                                    window_size=vc.window_size, patch_size=vc.patch_size)
    segs = qwen_vision_segments(cfg, grid)
    assert segs[0] == (cu[1:] - cu[:-1]).tolist()
    assert segs[1] == [240, 64, 64, 108]  # full attention per frame


def test_tiny_pruned_inside_llm():
    """Stage D: 20 tokens in layers 0-1, 12 in layers 2-3, run layer by layer on sliced states."""
    torch.manual_seed(0)
    lm = LlamaModel(_tiny_llama(layers=4)).eval()
    x = torch.randn(1, 20, 64)
    pos = torch.arange(20)[None]
    keep = torch.tensor([0, 1, 2, 5, 7, 8, 11, 13, 16, 17, 18, 19])

    def run():
        h = x
        cos, sin = lm.rotary_emb(h, pos)
        p = pos
        for i, layer in enumerate(lm.layers):
            if i == 2:
                h, cos, sin, p = h[:, keep], cos[:, keep], sin[:, keep], p[:, keep]
            h = layer(h, attention_mask=None, position_ids=p, position_embeddings=(cos, sin))
        return h

    got = measured(run)
    base = nominal_schedule(lm.config, 14, 6)  # 14 visual + 6 text
    s = prune_schedule(base, {2: 6})
    assert s.llm_tokens_per_layer == [20, 20, 12, 12]
    r = count_flops(lm.config, s)
    assert close(got, r.llm_prefill_flops)
    assert r.eq_visual_tokens == 10


def test_tiny_bare_qwen2_text():
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=300)
    lm = Qwen2Model(cfg).eval()
    got = measured(lambda: lm(inputs_embeds=torch.randn(1, 23, 64), use_cache=False))
    assert close(got, count_flops(cfg, nominal_schedule(cfg, 0, 23)).llm_prefill_flops)


@pytest.mark.parametrize(
    "vc",
    [
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, vision_use_head=True),
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14),
        Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                     use_swiglu_ffn=True),
    ],
    ids=["siglip_head", "dinov2", "dinov2_swiglu"],
)
def test_tiny_other_vision_towers(vc):
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=vc, text_config=_tiny_llama())
    tower = AutoModel.from_config(vc).eval()
    got = measured(lambda: tower(torch.randn(1, 3, 56, 56)))
    s = nominal_schedule(cfg, 16, 3)
    expect_seq = 16 if vc.model_type.startswith("siglip") else 17
    assert s.vision_tokens_per_layer == [[expect_seq] * 2]
    assert close(got, count_flops(cfg, s).vision_flops)
