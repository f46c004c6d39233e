"""TransPrune pure kernels: the hand examples and invariants of docs/methods/transprune.md section 7.

Not encoded here (need real models or the reference repository): recipe 5 (IGA rows vs eager
``output_attentions`` of tiny Llama / Qwen2-VL), the model-level parts of recipe 6 (``keep_ratios =
(1, 1, 1)`` gives the unpatched logits, cached generation == no-cache re-run, batch == each sample
alone through the model), and recipe 7 (reference equivalence with ``transprune_forward``).
"""
import math

import pytest
import torch

from vtprune.methods import transprune as TP

# Hand example (recipe 1): L = 8, image span [2, 6), keep 2, D = 2.
IMG, N_IMG, L = 2, 4, 8


def hand_tensors():
    a_in = torch.tensor([[[1.0, 0.0]] * L])
    a_out = torch.tensor([[[1.0, 0.0]] * 2 + [[2.0, 0.0], [0.0, 1.0], [0.5, 0.0], [-1.0, 0.0]] + [[1.0, 0.0]] * 2])
    f_in = torch.tensor([[[1.0, 0.0]] * L])
    f_out = torch.tensor([[[1.0, 0.0]] * L])
    return a_in, a_out, f_in, f_out


def hand_layer_ttv(**kw):
    a_in, a_out, f_in, f_out = hand_tensors()
    return TP.ttv(a_in, a_out, **kw) + TP.ttv(f_in, f_out, **kw)


# --------------------------------------------------------------------------------- recipe 1
def test_recipe1_attention_ttv_signed_sequence():
    a_in, a_out, _, _ = hand_tensors()
    t = TP.ttv(a_in, a_out)
    assert t.shape == (1, L) and t.dtype == torch.float32
    # Z = 6 + e + e^2 = 16.1073; image tokens 2/Z, e/Z, .5/Z, e^2/Z
    assert t[0, IMG : IMG + N_IMG].tolist() == pytest.approx([0.12417, 0.16876, 0.03104, 0.45874], abs=1e-5)
    assert t[0, [0, 1, 6, 7]].tolist() == pytest.approx([1 / 16.1073] * 4, abs=1e-5)
    _, _, f_in, f_out = hand_tensors()
    assert TP.ttv(f_in, f_out)[0].tolist() == pytest.approx([0.125] * L, abs=1e-7)


def test_recipe1_layer_ttv_and_normalised():
    layer = hand_layer_ttv()
    img = layer[:, IMG : IMG + N_IMG]
    assert img[0].tolist() == pytest.approx([0.24917, 0.29376, 0.15604, 0.58374], abs=1e-5)
    t_hat = img / (img.sum() + 1e-8)
    assert t_hat[0].tolist() == pytest.approx([0.19425, 0.22902, 0.12165, 0.45508], abs=1e-5)


def hand_attention():
    """Head-mean probabilities (1, 8, 8), causal; the instruction rows 6 and 7 average to the image
    columns [.05, .20, .30, .05]."""
    a = torch.zeros(1, L, L)
    for q in range(L):
        a[0, q, : q + 1] = 1.0 / (q + 1)
    a[0, 6] = torch.tensor([0.2, 0.2, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0])
    a[0, 7] = torch.tensor([0.1, 0.1, 0.0, 0.2, 0.3, 0.1, 0.1, 0.1])
    return a


def test_recipe1_iga_from_attention_rows():
    I = TP.iga(hand_attention(), IMG, N_IMG, prompt_end=L)
    assert I[0].tolist() == pytest.approx([0.05, 0.20, 0.30, 0.05], abs=1e-7)
    # rows given only for the instruction queries (query_start = 6)
    I2 = TP.iga(hand_attention()[:, 6:], IMG, N_IMG, prompt_end=L, query_start=6)
    assert torch.equal(I, I2)
    # per-head input is averaged over heads
    heads = torch.stack([hand_attention() * 0.5, hand_attention() * 1.5], dim=1)
    assert torch.allclose(TP.iga(heads, IMG, N_IMG, prompt_end=L), I)


def test_recipe1_select_with_iga():
    ttv_img = hand_layer_ttv()[:, IMG : IMG + N_IMG]
    I = torch.tensor([[0.05, 0.20, 0.30, 0.05]])
    i_hat = I / (I.sum() + 1e-8)
    assert i_hat[0].tolist() == pytest.approx([0.0833, 0.3333, 0.5, 0.0833], abs=1e-4)
    scores = TP.transprune_scores(ttv_img, I, alpha=0.5)
    # The spec lists the code-form scores T + I = [.2776, .5624, .6217, .5384]; the library's
    # alpha-form with alpha = .5 is exactly half of that (identical ranking).
    assert (2 * scores[0]).tolist() == pytest.approx([0.2776, 0.5624, 0.6217, 0.5384], abs=1e-4)
    keep = TP.transprune_select(ttv_img, I, 2)
    assert (keep[0] + IMG).tolist() == [3, 4]


def test_recipe1_select_uniform_iga():
    ttv_img = hand_layer_ttv()[:, IMG : IMG + N_IMG]
    I = torch.full((1, 4), 0.25)
    scores = TP.transprune_scores(ttv_img, I)
    assert (2 * scores[0]).tolist() == pytest.approx([0.4443, 0.4790, 0.3717, 0.7051], abs=1e-4)
    assert (TP.transprune_select(ttv_img, I, 2)[0] + IMG).tolist() == [3, 5]


def test_recipe1_paper_variant():
    layer = hand_layer_ttv(direction="abs", norm_scope="image", image_span=(IMG, IMG + N_IMG))
    assert layer[0, [0, 1, 6, 7]].tolist() == [0.0] * 4  # outside the softmax domain
    img = layer[:, IMG : IMG + N_IMG]
    t_hat = img / (img.sum() + 1e-8)
    assert t_hat[0].tolist() == pytest.approx([0.2873, 0.3475, 0.1617, 0.2035], abs=1e-4)
    keep = TP.transprune_select(img, torch.full((1, 4), 0.25), 2)
    assert (keep[0] + IMG).tolist() == [2, 3]


def test_image_span_forms_agree():
    a_in, a_out, _, _ = hand_tensors()
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, IMG : IMG + N_IMG] = True
    t1 = TP.ttv(a_in, a_out, norm_scope="image", image_span=(IMG, IMG + N_IMG))
    t2 = TP.ttv(a_in, a_out, norm_scope="image", image_span=mask)
    t3 = TP.ttv(a_in, a_out, norm_scope="image", image_span=[(IMG, IMG + N_IMG)])
    assert torch.equal(t1, t2) and torch.equal(t1, t3)


def test_batch_scope_equals_sequence_at_bs1():
    a_in, a_out, _, _ = hand_tensors()
    assert torch.equal(TP.ttv(a_in, a_out, norm_scope="batch"), TP.ttv(a_in, a_out))


# --------------------------------------------------------------------------------- recipe 2
def test_recipe2_stage_counts():
    assert TP.stage_counts(576) == (576, 504, 360, 72)
    assert TP.stage_counts(2928) == (2928, 2562, 1830, 366)
    assert TP.stage_counts(1000) == (1000, 875, 625, 125)
    assert TP.stage_counts(576, (1.0, 1.0, 1.0)) == (576, 576, 576, 576)


# --------------------------------------------------------------------------------- recipe 3
def test_recipe3_alignment_after_stage1():
    g = torch.Generator().manual_seed(0)
    Lf, img, n0 = 30, 5, 16
    x_in = torch.randn(1, Lf, 8, generator=g, dtype=torch.float64)
    x_out = torch.randn(1, Lf, 8, generator=g, dtype=torch.float64)
    stored = TP.ttv(x_in, x_out)  # layer 7, computed on the full sequence
    keep = TP.transprune_select(stored[:, img : img + n0], torch.rand(1, n0, generator=g), 14)
    idx = TP.keep_gather_index(Lf, img, n0, keep)
    gathered = stored.gather(1, idx)
    # recomputation on the gathered tensors, keeping the full-sequence normalisation constant
    xi, xo = x_in[0, idx[0]], x_out[0, idx[0]]
    recompute = TP.ttv(xi[None], xo[None])

    def z(a, b):  # independent: sum of exp(1 - cos) over the sequence
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        return torch.exp(1 - cos).sum()

    ratio = z(xi, xo) / z(x_in[0], x_out[0])
    assert torch.allclose(gathered, recompute * ratio, rtol=1e-12, atol=0)
    assert not torch.allclose(gathered, recompute)  # normalisation constants are not recomputed


def test_keep_gather_index():
    idx = TP.keep_gather_index(10, 2, 5, torch.tensor([0, 3]))
    assert idx.tolist() == [0, 1, 2, 5, 7, 8, 9]
    idxb = TP.keep_gather_index(10, 2, 5, torch.tensor([[0, 3], [1, 4]]))
    assert idxb.tolist() == [[0, 1, 2, 5, 7, 8, 9], [0, 1, 3, 6, 7, 8, 9]]


# --------------------------------------------------------------------------------- recipe 4
def test_recipe4_decode_offsets():
    off = TP.decode_offsets(576)
    assert len(off) == 32
    L_full = 651
    pos = [L_full + o for o in off]  # first decode token (t = 0), layers 1..32
    assert pos[:7] == [651] * 7
    assert pos[7:9] == [579] * 2
    assert pos[9:12] == [435] * 3
    assert pos[12:] == [147] * 20
    assert TP.decode_offsets(576, (1.0, 1.0, 1.0)) == (0,) * 32


# --------------------------------------------------------------------------------- recipe 6
def test_recipe6_stage_simulation_counts_and_text_kept():
    g = torch.Generator().manual_seed(1)
    pre, n0, post = 35, 576, 40
    Lc = pre + n0 + post
    seq = torch.arange(Lc)[None]  # original positions carried through the gathers
    counts = TP.stage_counts(n0)
    n = n0
    for s in range(3):
        t = torch.rand(1, n, generator=g, dtype=torch.float64)
        i = torch.rand(1, n, generator=g, dtype=torch.float64)
        keep = TP.transprune_select(t, i, counts[s + 1])
        assert keep.shape == (1, counts[s + 1])
        assert keep[0].tolist() == sorted(set(keep[0].tolist()))
        seq = seq.gather(1, TP.keep_gather_index(seq.shape[1], pre, n, keep))
        n = counts[s + 1]
    assert seq.shape[1] == pre + 72 + post
    kept = seq[0].tolist()
    assert kept[:pre] == list(range(pre)) and kept[-post:] == list(range(pre + n0, Lc))
    assert kept == sorted(kept)


def test_recipe6_keep_all_is_identity():
    t, i = torch.rand(1, 576), torch.rand(1, 576)
    keep = TP.transprune_select(t, i, 576)
    assert keep[0].tolist() == list(range(576))
    assert TP.keep_gather_index(700, 50, 576, keep)[0].tolist() == list(range(700))


def test_recipe6_ties_lowest_index_and_determinism():
    t = torch.ones(1, 6)
    i = torch.ones(1, 6)
    assert TP.transprune_select(t, i, 3)[0].tolist() == [0, 1, 2]
    g = torch.Generator().manual_seed(2)
    t, i = torch.rand(2, 100, generator=g), torch.rand(2, 100, generator=g)
    assert torch.equal(TP.transprune_select(t, i, 30), TP.transprune_select(t, i, 30))
    assert TP.transprune_select(t[0], i[0], 30).dim() == 1


def test_recipe6_batch_equals_each_alone():
    g = torch.Generator().manual_seed(3)
    B, Lb, D = 3, 12, 6
    x_in = torch.randn(B, Lb, D, generator=g)
    x_out = torch.randn(B, Lb, D, generator=g)
    lengths = [12, 9, 7]  # left padding
    valid = torch.zeros(B, Lb, dtype=torch.bool)
    for b, n in enumerate(lengths):
        valid[b, Lb - n :] = True
    out = TP.ttv(x_in, x_out, valid_mask=valid)
    for b, n in enumerate(lengths):
        alone = TP.ttv(x_in[b : b + 1, Lb - n :], x_out[b : b + 1, Lb - n :])
        assert torch.allclose(out[b, Lb - n :], alone[0], atol=1e-7)
        assert torch.all(out[b, : Lb - n] == 0)
    # the bug-compatible "batch" scope couples the samples
    coupled = TP.ttv(x_in, x_out, valid_mask=valid, norm_scope="batch")
    assert not torch.allclose(coupled, out)
    assert coupled.sum().item() < out.sum().item()
    # selection: batch == each alone
    t, i = torch.rand(B, 50, generator=g), torch.rand(B, 50, generator=g)
    kb = TP.transprune_select(t, i, 10)
    for b in range(B):
        assert torch.equal(kb[b], TP.transprune_select(t[b : b + 1], i[b : b + 1], 10)[0])


def test_ttv_fp32_from_half_inputs():
    a_in, a_out, _, _ = hand_tensors()
    t = TP.ttv(a_in.half(), a_out.half())
    assert t.dtype == torch.float32
    assert t[0, 5].item() == pytest.approx(math.e ** 2 / (6 + math.e + math.e ** 2), abs=1e-4)
