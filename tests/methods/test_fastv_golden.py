"""FastV against the authors' code: golden fixtures from github.com/pkunlp-icler/FastV @ d165972.

``tests/fixtures/fastv/cases.pt`` holds seeded per-head attention rows of the last prompt token and
the ``keep_indexs`` / ``position_ids`` that the reference's selection statements produced: fork (a),
the paper's transformers-4.31 Llama (``fast_v_attention_rank`` = kept count), and fork (b), the
HF-LLaVA fork (``fastv_r`` = fraction pruned, ``round(M * (1 - R))`` kept). Provenance in that
folder's README.

vtprune's :class:`FastV` must keep the same positions (every non-image token plus the chosen image
tokens) with the original positions. Ties that stay on one side of the top-k cut are covered; ties
that cross it are not (the reference's ``topk`` order is unspecified; vtprune takes the lowest index).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtprune.methods.fastv import FastV, topk_lowest_index
from vtprune.policy import Context, DecoderView

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fastv" / "cases.pt"
DATA = torch.load(FIXTURE, weights_only=True)
RUNS = [(c, r) for c in DATA["cases"] for r in c["runs"]]
IDS = [f"{c['name']}-{r['fork']}-{r.get('rank', r.get('r'))}" for c, r in RUNS]
K = 2  # the pruning layer; the signal is the head-mean last row of layer K - 1


def test_fixture_provenance():
    assert DATA["reference_commit"].startswith("d165972")
    assert len(RUNS) == 22


def _policy(run) -> FastV:
    return FastV(layer=K, keep=run["rank"]) if run["fork"] == "a" else FastV(layer=K, r=run["r"])


@pytest.mark.parametrize("case,run", RUNS, ids=IDS)
def test_policy_select_matches_reference(case, run):
    n, S, M = case["seq_length"], case["sys_length"], case["image_length"]
    visual = torch.zeros(n, dtype=torch.bool)
    visual[S:S + M] = True
    last_row = case["last_rows"].double().mean(dim=0)  # head mean, as the reference's torch.mean(dim=1)
    view = DecoderView(hidden=torch.zeros(n, 1), visual=visual, image_id=torch.where(visual, 0, -1),
                       signals={f"last_row@{K - 1}": last_row}, original_index=torch.arange(n))
    pol = _policy(run)
    assert pol.signal_layers(32) == {K - 1: "last_row"}
    kept_visual = pol.select(K, view, Context("llava"))
    assert kept_visual.numel() == pol.budget(M, K)
    keep = torch.sort(torch.cat([torch.nonzero(~visual).flatten(), kept_visual])).values
    assert keep.tolist() == run["keep_indexs"].tolist()
    # original positions: the survivors' position ids are their indices in the unpruned sequence
    assert view.original_index[keep].tolist() == run["position_ids"][0].tolist()


@pytest.mark.parametrize("case,run", RUNS, ids=IDS)
def test_kernel_matches_reference(case, run):
    S, M = case["sys_length"], case["image_length"]
    scores = case["last_rows"].double().mean(dim=0)[S:S + M]
    k = run["rank"] if run["fork"] == "a" else round(M * (1 - run["r"]))
    top = topk_lowest_index(scores, k) + S
    ref_image = [i for i in run["keep_indexs"].tolist() if S <= i < S + M]
    assert top.tolist() == ref_image
