"""TransPrune against the authors' code: golden fixtures from github.com/liaolea/TransPrune @ c9e8284.

``tests/fixtures/transprune/cases.pt`` holds, per case, seeded module inputs/outputs of the attention
and FFN of every accumulation layer (1-based 7..12, at the sequence length of that layer) and the
query/key states of the layer after each pruning layer (7, 9, 12), plus what the reference kept at
each stage: the kept image positions and the surviving original positions (provenance in that
folder's README). The whole three-stage "High" schedule runs on one sample (the reference supports
batch size 1 only), so the stored TTV vectors are gathered after every prune as in the reference.

vtprune's default ``ttv_norm_scope="sequence"`` equals the reference at batch size 1; the reference's
``T + I`` and vtprune's ``alpha*T + (1 - alpha)*I`` with alpha 0.5 rank identically. Compared: the
kept positions of every stage, exactly, through the kernels and through the registered policy.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vtprune.methods.transprune import (
    TransPrune,
    iga,
    keep_gather_index,
    stage_counts,
    transprune_select,
    ttv,
)
from vtprune.policy import Context, DecoderView

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "transprune" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
CASES = DATA["cases"]
IDS = [c["name"] for c in CASES]
ACCUM, PRUNE = DATA["accum_layers"], DATA["prune_layers"]
F64 = torch.float64


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("c9e8284")
    assert (ACCUM, PRUNE) == ([7, 8, 9, 10, 11, 12], [7, 9, 12])
    assert tuple(DATA["ratios"][1:]) == TransPrune().keep_ratios
    assert len(CASES) == 3


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(1, H, L, L) causal softmax(q k^T / sqrt(dh)) computed in fp32 like the reference's IGA."""
    L, dh = q.shape[2], q.shape[3]
    logits = q.to(F64) @ k.to(F64).transpose(-1, -2) / math.sqrt(dh)
    logits = logits + torch.triu(torch.full((L, L), torch.finfo(F64).min, dtype=F64), diagonal=1)
    return torch.softmax(logits, dim=-1, dtype=torch.float32).to(F64)


def _layer_ttv(io):
    a_in, a_out, f_in, f_out = (t.to(F64) for t in io)
    return ttv(a_in, a_out), ttv(f_in, f_out)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_match_reference_at_every_stage(case):
    S, n0 = case["sys_length"], case["n0"]
    counts = stage_counts(n0)
    L = S + n0 + case["text_length"]
    labels = torch.arange(L)
    stored, io = [], iter(case["layer_io"])
    for layer in range(1, max(PRUNE) + 1):
        if layer in ACCUM:
            a, f = _layer_ttv(next(io))
            stored.append(a + f)
        if layer in PRUNE:
            s = PRUNE.index(layer)
            stage = case["stages"][s]
            n_s, n_next, Lc = counts[s], counts[s + 1], labels.numel()
            t_acc = sum(stored)[:, S:S + n_s]
            i_img = iga(_probs(stage["q"], stage["k"]), S, n_s, Lc)
            keep = transprune_select(t_acc, i_img, n_next)[0]
            assert (keep + S).tolist() == stage["kept_positions"].tolist(), f"stage {s}"
            idx = keep_gather_index(Lc, S, n_s, keep)
            stored = [t[:, idx] for t in stored]
            labels = labels[idx]
            assert labels.tolist() == stage["labels_after"].tolist()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_policy_matches_reference_at_every_stage(case):
    """Through the registered policy's ``select`` with the hook layer's signals (TTV of each module of
    the accumulation layers, IGA rows of the layer after each pruning layer), at the default layers."""
    pol = TransPrune()
    assert pol.pruning_layers(32) == PRUNE
    sig_layers = pol.signal_layers(32)
    assert all(set(sig_layers[a - 1]) >= {"attn_io", "mlp_io"} for a in ACCUM)
    assert all("post_visual_rows" in sig_layers[p] for p in PRUNE)
    S, n0 = case["sys_length"], case["n0"]
    L = S + n0 + case["text_length"]
    pos = torch.arange(L)  # current sequence -> original position
    visual = (pos >= S) & (pos < S + n0)
    signals, io = {}, iter(case["layer_io"])
    for layer in range(1, max(PRUNE) + 1):
        if layer in ACCUM:
            a, f = _layer_ttv(next(io))
            signals[f"attn_io@{layer - 1}"], signals[f"mlp_io@{layer - 1}"] = a[0], f[0]
        if layer in PRUNE:
            stage = case["stages"][PRUNE.index(layer)]
            n_s = int(visual.sum())
            probs = _probs(stage["q"], stage["k"]).mean(dim=1)[0]  # head mean (Lc, Lc)
            signals[f"post_visual_rows@{layer}"] = probs[S + n_s:].mean(dim=0)
            signals["image_tokens_in@0"] = torch.where(visual, n0, 0)
            view = DecoderView(hidden=torch.zeros(pos.numel(), 1), visual=visual, image_id=torch.where(visual, 0, -1),
                               signals=signals, original_index=pos)
            kept = pol.select(layer, view, Context("llava"))
            assert kept.numel() == pol.budget_view(view, layer)
            assert kept.tolist() == stage["kept_positions"].tolist()
            idx = torch.sort(torch.cat([torch.nonzero(~visual).flatten(), kept])).values
            pos, visual = pos[idx], visual[idx]
            signals = {k: v[idx] for k, v in signals.items() if not k.startswith("post_visual_rows")}
            assert pos.tolist() == stage["labels_after"].tolist()
