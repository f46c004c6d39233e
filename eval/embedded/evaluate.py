"""Evaluation of the embedded VLM on the shipped benchmark: keep-all, random-k and oracle-k token
selection, answer prior, and the tower's attention-vs-object AUROC.

Pruned inputs are built explicitly, the way a pruning method hands them to a stock LLaVA: the kept
projected image features (raster order preserved) go in through
``mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[feats_kept, ...])}`` and
``input_ids`` holds exactly as many image placeholder tokens as kept features.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image

from . import generator as G
from .model import IMAGE_TOKEN, N_IMAGE_TOKENS


# ----------------------------------------------------------------------------- selection rules
def select_tokens(mode: str, k: int, relevant: list[int], rng: np.random.Generator, n: int = N_IMAGE_TOKENS) -> list[int]:
    """Sorted indices of the ``k`` kept tokens. ``oracle``: the question's relevant tokens (a random subset
    of them when there are more than k) padded with random other tokens; ``random``: uniform."""
    if k >= n or mode == "all":
        return list(range(n))
    if mode == "random":
        return sorted(rng.choice(n, size=k, replace=False).tolist())
    if mode == "oracle":
        rel = list(relevant)
        if len(rel) >= k:
            return sorted(rng.choice(rel, size=k, replace=False).tolist())
        rest = np.setdiff1d(np.arange(n), rel)
        return sorted(rel + rng.choice(rest, size=k - len(rel), replace=False).tolist())
    raise ValueError(mode)


# ----------------------------------------------------------------------------- model calls
@torch.no_grad()
def image_features(model, processor, images: list[Image.Image], batch_size: int = 32,
                   size: int | None = None) -> torch.Tensor:
    """Projected visual tokens, (n_images, 64, hidden), through the stock ``get_image_features``; with
    ``size``, the images are processed at ``size`` px instead ((size / 14)^2 tokens each)."""
    kw = {} if size is None else {"size": {"height": size, "width": size}, "crop_size": {"height": size, "width": size}}
    out = []
    for i in range(0, len(images), batch_size):
        pv = processor.image_processor(images=images[i:i + batch_size], return_tensors="pt", **kw).pixel_values
        feats = model.model.get_image_features(pixel_values=pv.to(model.device, model.dtype)).pooler_output
        out.append(torch.stack(list(feats)))
    return torch.cat(out)


@torch.no_grad()
def answer_batch(model, tokenizer, feats_kept: list[torch.Tensor], questions: list[str]) -> list[str]:
    """Greedy one-token answers for single-question prompts whose image part is ``feats_kept[i]``."""
    img_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    seqs = [[img_id] * f.shape[0] + tokenizer(q, add_special_tokens=False).input_ids for f, q in zip(feats_kept, questions)]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(feats_kept))},
                logits_to_keep=0)
    last = mask.sum(1) - 1
    pred = out.logits[torch.arange(len(seqs)), last.to(out.logits.device)].argmax(-1).tolist()
    return tokenizer.convert_ids_to_tokens(pred)


def _select_record(mode: str, k: int, rec: dict, rng: np.random.Generator) -> list[int]:
    return select_tokens(mode, k, rec["relevant_tokens"], rng)


def evaluate(model, processor, records: list[dict], budgets=(("all", 64),), seed: int = 0, repeats: int = 1,
             batch_size: int = 64, feats: torch.Tensor | list[torch.Tensor] | None = None, select=None) -> dict:
    """Accuracy per (mode, k) overall and per question type.

    ``budgets``: iterable of (mode, k) with mode in all/random/oracle. Random draws are seeded per
    (seed, repeat, question index) so results do not depend on batching. ``feats``: per image (sorted
    paths), its visual tokens ((n, D) each; computed when None). ``select(mode, k, record, rng) -> kept
    indices`` replaces :func:`select_tokens` (other layouts, e.g. the AnyRes model). Returns
    ``{(mode, k): {"acc": float, "by_type": {...}, "n": int, "preds": [(record index, predicted word), ...]}}``
    (``preds`` in evaluation order, every draw).
    """
    select = select or _select_record
    tok = processor.tokenizer
    paths = sorted({r["image_path"] for r in records})
    index = {p: i for i, p in enumerate(paths)}
    if feats is None:
        feats = image_features(model, processor, [Image.open(p).convert("RGB") for p in paths])
    results = {}
    for mode, k in budgets:
        correct, by_type, predictions = [], defaultdict(list), []
        for rep in range(repeats if mode != "all" else 1):
            for b in range(0, len(records), batch_size):
                chunk = records[b:b + batch_size]
                kept = []
                for j, r in enumerate(chunk):
                    rng = np.random.default_rng([seed, rep, b + j])
                    idx = select(mode, k, r, rng)
                    kept.append(feats[index[r["image_path"]]][idx])
                preds = answer_batch(model, tok, kept, [r["question"] for r in chunk])
                for j, (r, p) in enumerate(zip(chunk, preds)):
                    ok = float(p == r["answer"])
                    correct.append(ok)
                    by_type[r["type"]].append(ok)
                    predictions.append((b + j, p))
        results[(mode, k)] = {"acc": float(np.mean(correct)), "n": len(correct), "preds": predictions,
                              "by_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())}}
    return results


def answer_prior(records: list[dict], train_records: list[dict] | None = None) -> dict:
    """Accuracy of always answering the most frequent answer of each question type.

    With ``train_records`` the majority answers come from there (a fair prior); otherwise from ``records``
    itself (an upper bound on any image-blind constant guess per type)."""
    src = train_records if train_records is not None else records
    maj = {t: Counter(r["answer"] for r in src if r["type"] == t).most_common(1)[0][0] for t in {r["type"] for r in src}}
    hits = defaultdict(list)
    for r in records:
        hits[r["type"]].append(float(maj.get(r["type"]) == r["answer"]))
    return {"acc": float(np.mean([h for v in hits.values() for h in v])),
            "by_type": {t: float(np.mean(v)) for t, v in sorted(hits.items())}, "majority": maj}


# ----------------------------------------------------------------------------- attention AUROC
@torch.no_grad()
def attention_auroc(vision_tower, processor, bench_dir=G.DEFAULT_BENCH_DIR, max_images: int | None = None,
                    batch_size: int = 32) -> list[float]:
    """Per tower layer: AUROC of the attention each patch receives (mean over heads and all query rows,
    CLS column dropped) as a score for "this patch belongs to an object" (``scenes.jsonl`` ground truth)."""
    import json
    from pathlib import Path

    from sklearn.metrics import roc_auc_score

    scenes = [json.loads(l) for l in (Path(bench_dir) / "scenes.jsonl").read_text().splitlines() if l.strip()]
    scenes = scenes[:max_images] if max_images else scenes
    labels = np.zeros((len(scenes), G.GRID * G.GRID))
    for i, s in enumerate(scenes):
        labels[i, s["object_tokens"]] = 1
    prev = vision_tower.config._attn_implementation
    vision_tower.set_attn_implementation("eager")  # SDPA returns no attention probabilities
    try:
        per_layer = None
        for b in range(0, len(scenes), batch_size):
            ims = [Image.open(Path(bench_dir) / s["image"]).convert("RGB") for s in scenes[b:b + batch_size]]
            pv = processor.image_processor(images=ims, return_tensors="pt").pixel_values
            att = vision_tower(pixel_values=pv.to(vision_tower.device, vision_tower.dtype), output_attentions=True).attentions
            recv = [a[:, :, :, 1:].float().mean(dim=(1, 2)).cpu().numpy() for a in att]
            per_layer = recv if per_layer is None else [np.concatenate([p, r]) for p, r in zip(per_layer, recv)]
    finally:
        vision_tower.set_attn_implementation(prev)
    return [float(roc_auc_score(labels.reshape(-1), r.reshape(-1))) for r in per_layer]
