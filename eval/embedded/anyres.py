"""The AnyRes embedded VLM (``embedded-anyres``): a stock ``LlavaNextForConditionalGeneration`` with the
same frozen DINOv2-S/14 tower as ``embedded``, and its benchmark (scenes, layout, config, processor,
oracle selections).

Images are 112x112, 112x224, 224x112 or 224x224 px (H x W). LLaVA-NeXT sees a **base view** (the whole
image resized to 112x112 -> 8x8 = 64 tokens) and **AnyRes crops**: grid pinpoints 1x1, 1x2, 2x1, 2x2
crops of 112 px (the 2x2 grid is twice the base resolution); each image has exactly the size of its
pinpoint, so crops are exact tiles and nothing is padded or unpadded.

Visual-token order (the order of the image placeholders, of ``get_image_features(...).pooler_output``
and of vtprune's LLaVA-NeXT adapter): the 64 base-view tokens in raster order, then the crop grid
as one ``8*nph`` x ``8*npw`` patch grid in raster order, each row followed by one ``image_newline``
slot. Crop patch (row R, col C) of the global crop grid is token ``64 + R*(8*npw + 1) + C``; it belongs
to crop ``1 + (R//8)*npw + C//8`` (view 0 = base view). A 224x224 image has 64 + 16*17 = 336 tokens
(16 of them newlines), 112x224 200, 224x112 208, 112x112 136.

Scenes: objects (colour, shape, size as in ``generator``) on a layout grid of 28 px cells, spread
**unevenly** across crops: on multi-crop images one or two "focus" crops get most objects.
``relevant_tokens`` of a question index the visual-token order above and cover the objects in the base
view *and* in the crops (newline slots never). A patch belongs to an object when the object's mask
covers at least ``generator.MIN_COVER`` of it or holds its centre (base view: the patch's footprint on
the original image).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import generator as G
from . import model as M
from .dinov2_from_onnx import IMAGE_MEAN, IMAGE_STD, dinov2_small_config

NAME = "embedded-anyres"
BASE = 112  # base-view side and crop side, px
SIDE = BASE // G.PATCH  # 8 patches per view side
PINPOINTS = [[112, 112], [112, 224], [224, 112], [224, 224]]  # (H, W)
IMAGE_SIZES = tuple(tuple(p) for p in PINPOINTS)
SIZE_P = (0.1, 0.2, 0.2, 0.5)  # image-size mix: mostly multi-crop images
BOX = 56  # placement box, px: an object never crosses a box border (so never a crop or quadrant border)
CELL = 28  # (row, col) of an object's centre on a 28 px grid: the listing's raster order
GAP = 2  # px between objects
PLACE_TRIES = 40
MAX_OBJECTS_MULTI = 8  # multi-crop images hold 3..8 objects (single-crop: 1..generator.MAX_OBJECTS)
FOCUS_P = 0.8  # share of objects placed in the focus crop(s) of a multi-crop image
TWO_FOCUS_P = 0.3  # chance of two focus crops instead of one
OBJ_SIZES = {"small": 10, "large": 16}  # half-extent in px of the full-resolution image (crops)
MAX_TEXT = 512

_ASSETS = Path(__file__).resolve().parents[2] / "assets" / NAME
DEFAULT_BENCH_DIR = _ASSETS / "bench"
MODEL_DIR = _ASSETS / "model"
HELDOUT_SEED = 20240611
HELDOUT_IMAGES = 150
HELDOUT_QUESTIONS_PER_IMAGE = 4

TEXT_KW = dict(M.TEXT_KW, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=MAX_TEXT)


# ----------------------------------------------------------------------------- layout
def grid_shape(h: int, w: int) -> tuple[int, int]:
    """Crops per column and per row ``(nph, npw)`` of an ``h`` x ``w`` image."""
    if (h, w) not in IMAGE_SIZES:
        raise ValueError(f"image size {h}x{w} is not one of the pinpoints {PINPOINTS}")
    return h // BASE, w // BASE


def token_views(h: int, w: int) -> np.ndarray:
    """(n_tokens,) view of each visual token of an ``h`` x ``w`` image: 0 base view, 1.. crops row-major,
    -1 newline slots."""
    nph, npw = grid_shape(h, w)
    out = [0] * SIDE * SIDE
    for r in range(nph * SIDE):
        out += [1 + (r // SIDE) * npw + c // SIDE for c in range(npw * SIDE)] + [-1]
    return np.array(out)


def crop_token(r: int, c: int, w: int) -> int:
    """Visual-token index of patch (r, c) of the global crop grid of a ``w`` px wide image."""
    return SIDE * SIDE + r * ((w // BASE) * SIDE + 1) + c


def object_tokens(mask: np.ndarray, cx: int, cy: int) -> tuple[list[int], list[int]]:
    """(base-view tokens, crop tokens) of an object with pixel ``mask`` (h, w) and centre (cx, cy)."""
    h, w = mask.shape  # base-view patches are (h / 8) x (w / 8) px of the image, crop patches 14 x 14
    b = sorted(r * SIDE + c for r, c in G.covered_cells(mask, h // SIDE, w // SIDE, (cy * SIDE // h, cx * SIDE // w)))
    c = sorted(crop_token(r, cc, w) for r, cc in G.covered_cells(mask, G.PATCH, G.PATCH, (cy // G.PATCH, cx // G.PATCH)))
    return b, c


# ----------------------------------------------------------------------------- scenes
@dataclass
class AnyresObj(G.Obj):
    """``generator.Obj`` on an ``h`` x ``w`` image; ``tokens`` index the visual-token order."""

    canvas: tuple[int, int] = (BASE, BASE)  # (h, w)
    crop: int = 1  # the crop (view) holding the object's centre

    @property
    def quadrant(self) -> str:
        (cx, cy), (h, w) = self.center, self.canvas
        return G.QUADRANTS[(2 if cy >= h // 2 else 0) + (1 if cx >= w // 2 else 0)]


def _fits(cx: int, cy: int, hx: int, placed: list[tuple[int, int, int]]) -> bool:
    return all(max(abs(cx - x), abs(cy - y)) > hx + h2 + GAP for x, y, h2 in placed)


def make_scene(rng: np.random.Generator) -> G.Scene:
    """One scene; objects concentrate in one or two focus crops of a multi-crop image. Each object lies
    inside one ``BOX`` px box (so inside one crop and one quadrant), apart from the others by ``GAP`` px."""
    h, w = IMAGE_SIZES[int(rng.choice(len(IMAGE_SIZES), p=SIZE_P))]
    nph, npw = grid_shape(h, w)
    n_crops = nph * npw
    n = int(rng.integers(1, G.MAX_OBJECTS + 1)) if n_crops == 1 else int(rng.integers(3, MAX_OBJECTS_MULTI + 1))
    per = BASE // BOX
    boxes = [(r, c) for r in range(h // BOX) for c in range(w // BOX)]
    crop_of = lambda box: 1 + (box[0] // per) * npw + box[1] // per
    k = 2 if n_crops > 1 and rng.random() < TWO_FOCUS_P else 1
    focus = set((1 + rng.choice(n_crops, size=k, replace=False)).tolist())
    base = rng.integers(190, 246, size=3)
    grad = np.linspace(-8, 8, h)[:, None, None] * rng.choice([-1, 1])
    bg = base[None, None, :] + grad + rng.normal(0, 4, size=(h, w, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    objs: list[AnyresObj] = []
    placed: list[tuple[int, int, int]] = []
    color_names, size_names = list(G.COLORS), list(OBJ_SIZES)
    for _ in range(n):
        color = color_names[int(rng.integers(len(color_names)))]
        shape = G.SHAPES[int(rng.integers(len(G.SHAPES)))]
        if objs and rng.random() < G.REPEAT_P:
            color = objs[int(rng.integers(len(objs)))].color
        if objs and rng.random() < G.REPEAT_P:
            shape = objs[int(rng.integers(len(objs)))].shape
        size = size_names[int(rng.integers(len(size_names)))]
        hx = OBJ_SIZES[size]
        in_focus = rng.random() < FOCUS_P
        for _try in range(PLACE_TRIES):
            cand = [b for b in boxes if crop_of(b) in focus] if in_focus and _try < PLACE_TRIES // 2 else boxes
            br, bc = cand[int(rng.integers(len(cand)))]
            cx = bc * BOX + int(rng.integers(hx, BOX - hx))
            cy = br * BOX + int(rng.integers(hx, BOX - hx))
            if _fits(cx, cy, hx, placed):
                break
        else:
            continue  # no room left: fewer objects
        placed.append((cx, cy, hx))
        fill = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in G.COLORS[color])
        G._draw_shape(draw, shape, cx, cy, hx, fill)
        b, ct = object_tokens(np.asarray(G.shape_mask(shape, cx, cy, hx, (w, h))) > 0, cx, cy)
        objs.append(AnyresObj(color, shape, size, (cy // CELL, cx // CELL), (cx, cy), sorted(b + ct), (h, w),
                              crop_of((br, bc))))
    return G.Scene(objs, img)


def scenes_for(seed: int, n: int) -> list[G.Scene]:
    rng = np.random.default_rng(seed)
    return [make_scene(rng) for _ in range(n)]


def _scene_info(scene: G.Scene) -> tuple[dict, dict]:
    w, h = scene.image.size
    return {"size": [h, w], "grid": list(grid_shape(h, w)), "n_tokens": len(token_views(h, w))}, {"size": [h, w]}


def write_split(out_dir: str | Path = DEFAULT_BENCH_DIR, seed: int = HELDOUT_SEED, n_images: int = HELDOUT_IMAGES,
                questions_per_image: int = HELDOUT_QUESTIONS_PER_IMAGE) -> Path:
    """Write PNG images, ``questions.jsonl`` (with each image's ``size``), ``scenes.jsonl`` and ``meta.json``
    (``generator.write_split`` with these scenes); returns the questions path."""
    return G.write_split(out_dir, seed, n_images, questions_per_image, make=make_scene, scene_info=_scene_info,
                         geometry={"base": BASE, "patch_size": G.PATCH, "grid_pinpoints": PINPOINTS,
                                   "size_p": list(SIZE_P), "focus_p": FOCUS_P,
                                   "token_order": "base view 8x8 raster, then the crop grid in raster order "
                                                  "with one newline slot per row"})


def load_split(bench_dir: str | Path = DEFAULT_BENCH_DIR) -> list[dict]:
    return G.load_split(bench_dir)


# ----------------------------------------------------------------------------- model parts
def build_tokenizer():
    tok = M.build_tokenizer()
    tok.model_max_length = MAX_TEXT
    return tok


def build_config(tokenizer):
    from transformers import LlamaConfig, LlavaNextConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEXT_KW)
    return LlavaNextConfig(vision_config=dinov2_small_config(image_size=BASE), text_config=text,
                           image_token_id=tokenizer.convert_tokens_to_ids(M.IMAGE_TOKEN),
                           vision_feature_layer=M.VISION_FEATURE_LAYER, vision_feature_select_strategy="default",
                           projector_hidden_act="gelu", image_grid_pinpoints=PINPOINTS, tie_word_embeddings=True)


def build_image_processor():
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(size={"height": BASE, "width": BASE}, crop_size={"height": BASE, "width": BASE},
                                   do_center_crop=False, image_grid_pinpoints=PINPOINTS, image_mean=list(IMAGE_MEAN),
                                   image_std=list(IMAGE_STD), do_convert_rgb=True)


def build_processor(tokenizer=None):
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=build_image_processor(), tokenizer=tokenizer or build_tokenizer(),
                              patch_size=G.PATCH, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token=M.IMAGE_TOKEN)


# ----------------------------------------------------------------------------- features and selections
def pack(model, views: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Projected, packed visual tokens per image (the model's own ``pack_image_features`` with its
    ``image_newline``) from tower features ``views[i]``: (n_views_i, 64, C)."""
    mm = model.model
    proj = mm.multi_modal_projector(torch.cat(views)).split([len(v) for v in views])
    packed, _ = mm.pack_image_features(list(proj), torch.tensor(sizes), "default", image_newline=mm.image_newline)
    return packed


@torch.no_grad()
def image_features(model, processor, images: list[Image.Image], batch_size: int = 16) -> list[torch.Tensor]:
    """Packed projected visual tokens per image, (n_tokens_i, D), through the stock ``get_image_features``."""
    out = []
    for i in range(0, len(images), batch_size):
        enc = processor.image_processor(images=images[i:i + batch_size], return_tensors="pt")
        feats = model.model.get_image_features(pixel_values=enc.pixel_values.to(model.device, model.dtype),
                                               image_sizes=enc.image_sizes).pooler_output
        out += list(feats)
    return out


def _split(k: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integer budgets summing to ``min(k, caps.sum())``, proportional to ``weights`` (largest remainder,
    ties to the lowest index), each at most its cap; overflow goes to the others in proportion."""
    out = np.zeros(len(weights), dtype=int)
    left, open_ = k, caps > 0
    while left > 0 and open_.any():
        wts = np.where(open_, weights, 0.0).astype(float)
        if wts.sum() <= 0:
            wts = open_.astype(float)
        share = left * wts / wts.sum()
        add = np.floor(share).astype(int)
        order = np.argsort(-(share - add), kind="stable")
        for j in order[: left - add.sum()]:
            add[j] += 1
        add = np.minimum(add, caps - out)
        out += add
        left = k - out.sum()
        open_ = (caps - out) > 0
        if add.sum() == 0:
            break
    return out


def _relevant_first(pool: np.ndarray, rel: set, k: int, rng: np.random.Generator) -> list[int]:
    r = np.array([t for t in pool if t in rel], dtype=int)
    if len(r) >= k:
        return rng.choice(r, size=k, replace=False).tolist() if k else []
    rest = np.setdiff1d(pool, r)
    return r.tolist() + rng.choice(rest, size=k - len(r), replace=False).tolist()


SELECTIONS = ("all", "random", "oracle", "equal", "crop_aware", "equal_oracle", "crop_aware_oracle")


def select_tokens(mode: str, frac: float, relevant: list[int], views: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Sorted kept visual-token indices. Newline slots are always kept, outside the budget (as GlobalCom²
    does); the budget is ``int(frac * n)`` of the ``n`` patch tokens (base view + crops).

    ``random``: uniform. ``oracle``: the relevant tokens (a random subset when too many), padded with
    random others. Per-view budgets (the base view and each crop are views): ``equal`` gives every view
    the same budget, ``crop_aware`` a budget proportional to the view's relevant tokens (largest
    remainder, capped at the view's size, overflow to the others); within a view the tokens are drawn
    at random (so only the allocation knows the question), or relevant-first with the ``_oracle``
    suffix."""
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; one of {SELECTIONS}")
    cand = np.flatnonzero(views >= 0)
    newline = np.flatnonzero(views < 0).tolist()
    k = int(frac * len(cand))
    if mode == "all" or k >= len(cand):
        return list(range(len(views)))
    rel = set(relevant)
    if mode == "random":
        kept = rng.choice(cand, size=k, replace=False).tolist()
    elif mode == "oracle":
        kept = _relevant_first(cand, rel, k, rng)
    else:
        ids = np.unique(views[cand])
        caps = np.array([(views == v).sum() for v in ids])
        weights = (np.ones(len(ids)) if mode.startswith("equal")
                   else np.array([sum(views[t] == v for t in rel) for v in ids], dtype=float))
        kept = []
        for v, b in zip(ids, _split(k, weights, caps)):
            pool = np.flatnonzero(views == v)
            kept += (_relevant_first(pool, rel, int(b), rng) if mode.endswith("_oracle")
                     else rng.choice(pool, size=int(b), replace=False).tolist())
    return sorted(int(t) for t in kept + newline)


def select_record(mode: str, frac: float, rec: dict, rng: np.random.Generator) -> list[int]:
    """:func:`select_tokens` for a benchmark record (its ``size`` gives the layout)."""
    return select_tokens(mode, frac, rec["relevant_tokens"], token_views(*rec["size"]), rng)
