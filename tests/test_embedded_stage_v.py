"""Stage V on the real embedded default (DINOv2-S/14 tower, 112 px -> 8x8 = 64 patch tokens): PiToMe
merging inside the encoder and the ``downsample`` baseline run at the main job's budgets, keep-all ==
unpatched, and the tower's FLOPs fall with the tokens it runs."""
import pytest
import torch

import vtprune

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def embedded():
    from PIL import Image

    from vtprune.eval.embedded import load_embedded, load_split
    from vtprune.eval.embedded.model import prompt

    model, proc = load_embedded()
    recs = load_split()[:2]
    proc.tokenizer.padding_side = "left"
    inp = proc(text=[prompt(r["question"]) for r in recs], images=[Image.open(r["image_path"]).convert("RGB") for r in recs],
               return_tensors="pt", padding=True)
    assert model.config.vision_config.model_type == "dinov2" and inp["pixel_values"].shape[-1] == 112
    return model, inp


def _run(model, inp, spec):
    with vtprune.patch(model, spec) as h, torch.no_grad():
        logits = model(**inp).logits[:, -1]
    return logits, h.stats


def test_keep_all_equals_unpatched(embedded):
    model, inp = embedded
    with torch.no_grad():
        ref = model(**inp).logits[:, -1]
    for spec in ("pitome:ratio=1.0", "downsample:keep=1.0"):
        logits, stats = _run(model, inp, spec)
        assert stats.visual_tokens_per_image == [64, 64]
        torch.testing.assert_close(logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("keep,tokens", [(0.5, 32), (0.25, 16), (0.125, 8)])
def test_pitome_merges_inside_the_dinov2_tower(embedded, keep, tokens):
    model, inp = embedded
    _, full = _run(model, inp, "none")
    _, stats = _run(model, inp, f"pitome:keep={keep}")
    assert stats.visual_tokens_per_image == [tokens, tokens]
    layers = stats.vision_tokens_per_layer[0]
    assert len(layers) == 12 and layers[0] == 65 and layers[-1] > tokens  # the last layer's merge follows it
    assert all(b <= a for a, b in zip(layers, layers[1:]))
    base = vtprune.count_flops(model, full.schedules[0]).vision_flops
    assert vtprune.count_flops(model, stats.schedules[0]).vision_flops < base


@pytest.mark.parametrize("keep,side", [(0.5, 6), (0.25, 4), (0.125, 3)])
def test_downsample_runs_the_tower_at_round_sqrt_budget(embedded, keep, side):
    model, inp = embedded
    _, stats = _run(model, inp, f"downsample:keep={keep}")
    assert stats.visual_tokens_per_image == [side * side] * 2
    assert stats.vision_tokens_per_layer[0] == [side * side + 1] * 12
