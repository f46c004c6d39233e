"""Seeded, deterministic procedural VQA benchmark for the embedded VLM.

Scenes: ``IMAGE_SIZE`` px RGB images (a light, noisy, tinted background) with 1-6 objects, each with a
colour (5), a shape (3), a size (2) and a position on a 4x4 layout grid (one object per cell, jittered
inside the cell, so objects never overlap). Every question depends on small regions of the image and
has a one-word answer. Six types:

- ``color``: "what color is the {shape} ?" (the shape is unique in the scene) -> red/green/blue/yellow/purple;
  relevant: that object.
- ``shape``: "what shape is the {color} object ?" (unique colour) -> circle/square/triangle; relevant: the object.
- ``count``: "how many {color|shape} objects are there ?" -> 1..4; relevant: the matching objects.
- ``exists``: "is there a {color} {shape} ?" -> yes/no (balanced exactly in written splits); relevant: yes ->
  the match, no -> the objects sharing its colour or its shape, or every object when none does
  (``HARD_NEGATIVE_P`` of the "no" questions
  name a colour and a shape that are both present, never together).
- ``position``: "where is {ref} ?" -> top-left/top-right/bottom-left/bottom-right; relevant: the object.
- ``size``: "what size is {ref} ?" -> small/large; relevant: the object.

``{ref}`` is the shortest unambiguous reference: "the circle", "the red object" or "the red circle".

``relevant_tokens`` are visual-token indices in raster order on the vision tower's patch grid
(``GRID`` x ``GRID`` patches of ``PATCH`` px): a patch belongs to an object when the object's
pixel mask covers at least ``MIN_COVER`` of the patch's pixels or contains the object's centre.

Everything is a pure function of the seed (numpy ``default_rng`` + PIL drawing without
anti-aliasing), so the same seed gives identical scenes, questions and PNG bytes.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 8 -> 64 visual tokens
CELLS = 4  # layout grid: CELLS x CELLS cells of IMAGE_SIZE // CELLS px
CELL = IMAGE_SIZE // CELLS
MIN_COVER = 0.15
MAX_OBJECTS = 6
REPEAT_P = 0.3
HARD_NEGATIVE_P = 0.4  # share of "no" existence questions whose colour and shape are both in the scene  # chance that an object copies the colour (or the shape) of an earlier one

COLORS = {
    "red": (215, 38, 38),
    "green": (36, 160, 60),
    "blue": (40, 78, 215),
    "yellow": (232, 196, 24),
    "purple": (140, 52, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 12}  # half-extent in px
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "size")
COUNT_WORDS = ("1", "2", "3", "4")

# Every word the generator can emit (questions, answers, the training-only listing turn).
VOCAB_WORDS = sorted(set(
    ["what", "color", "is", "the", "object", "shape", "how", "many", "objects", "are", "there", "where", "size", "?", ",", ".", ":", "list", "answer", "yes", "no", "a"]
    + list(COLORS) + list(SHAPES) + list(SIZES) + list(QUADRANTS) + list(COUNT_WORDS)
))

DEFAULT_BENCH_DIR = Path(__file__).resolve().parents[2] / "assets" / "embedded" / "bench"
HELDOUT_SEED = 20240601
HELDOUT_IMAGES = 120
HELDOUT_QUESTIONS_PER_IMAGE = 4


@dataclass
class Obj:
    color: str
    shape: str
    size: str
    cell: tuple[int, int]  # (row, col) on the CELLS x CELLS layout grid
    center: tuple[int, int]  # (x, y) px
    tokens: list[int] = field(default_factory=list)

    @property
    def quadrant(self) -> str:
        r, c = self.cell
        return QUADRANTS[(2 if r >= CELLS // 2 else 0) + (1 if c >= CELLS // 2 else 0)]

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    objects: list[Obj]
    image: Image.Image

    def object_tokens(self) -> list[int]:
        return sorted({t for o in self.objects for t in o.tokens})


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, h: int, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "square":
        s = int(round(h * 0.85))
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - h), (cx - h, cy + h - 1), (cx + h, cy + h - 1)], fill=fill)
    else:
        raise ValueError(shape)


def shape_mask(shape: str, cx: int, cy: int, h: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> Image.Image:
    """The ``L`` mask (255 on the shape, 0 elsewhere) of a ``size`` = (w, h) px image holding ``shape`` of
    half-extent ``h`` centred at (cx, cy), drawn as the scenes draw it."""
    m = Image.new("L", size, 0)
    _draw_shape(ImageDraw.Draw(m), shape, cx, cy, h, 255)
    return m


def patch_index(x: int, y: int, grid: int = GRID) -> int:
    """Raster index of the patch holding pixel (x, y) on a ``grid`` x ``grid`` patch grid."""
    return int(min(y // PATCH, grid - 1) * grid + min(x // PATCH, grid - 1))


def covered_cells(mask: np.ndarray, cell_h: int, cell_w: int, centre: tuple[int, int]) -> set[tuple[int, int]]:
    """The coverage rule: the (row, col) cells of ``cell_h`` x ``cell_w`` px that the pixel ``mask`` ((h, w),
    bool or coverage in [0, 1], multiples of the cell sides) covers at least ``MIN_COVER`` of, plus the
    ``centre`` cell (the one holding the object's centre)."""
    h, w = mask.shape
    cover = mask.reshape(h // cell_h, cell_h, w // cell_w, cell_w).mean(axis=(1, 3))
    return {(int(r), int(c)) for r, c in np.argwhere(cover >= MIN_COVER)} | {centre}


def mask_tokens(mask: np.ndarray, cx: int, cy: int) -> list[int]:
    """An object's visual tokens on the square patch grid of its (h, h) pixel ``mask`` (:func:`covered_cells`
    with ``PATCH`` px cells; the centre cell holds (cx, cy)), as raster indices."""
    grid = mask.shape[0] // PATCH
    centre = divmod(patch_index(cx, cy, grid), grid)
    return sorted(r * grid + c for r, c in covered_cells(mask, PATCH, PATCH, centre))


def make_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(CELLS * CELLS, size=n, replace=False)
    # light background: a random tint, a gentle vertical gradient and mild noise
    base = rng.integers(190, 246, size=3)
    grad = np.linspace(-8, 8, IMAGE_SIZE)[:, None, None] * rng.choice([-1, 1])
    bg = base[None, None, :] + grad + rng.normal(0, 4, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    objs: list[Obj] = []
    color_names, size_names = list(COLORS), list(SIZES)
    for cell_id in cells:
        r, c = divmod(int(cell_id), CELLS)
        color = color_names[int(rng.integers(len(color_names)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if objs and rng.random() < REPEAT_P:  # repeats make counts above 1 common
            color = objs[int(rng.integers(len(objs)))].color
        if objs and rng.random() < REPEAT_P:
            shape = objs[int(rng.integers(len(objs)))].shape
        size = size_names[int(rng.integers(len(size_names)))]
        h = SIZES[size]
        slack = CELL // 2 - h - 1
        cx = c * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        cy = r * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        fill = tuple(int(np.clip(v + rng.integers(-18, 19), 0, 255)) for v in COLORS[color])
        _draw_shape(draw, shape, cx, cy, h, fill)
        toks = mask_tokens(np.asarray(shape_mask(shape, cx, cy, h)) > 0, cx, cy)
        objs.append(Obj(color, shape, size, (r, c), (cx, cy), toks))
    return Scene(objs, img)


def _toks(objs) -> list[int]:
    return sorted({t for o in objs for t in o.tokens})


def make_question(scene: Scene, qtype: str, rng: np.random.Generator, want_yes: bool | None = None) -> dict | None:
    """One question of ``qtype`` about ``scene`` or None when the scene does not allow it.

    ``want_yes`` forces the answer of an ``exists`` question (None: a fair coin)."""
    objs = scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objs if o.color == c] for c in COLORS}
    named = {}
    for o in objs:
        named.setdefault(o.name, []).append(o)
    unique_named = [v[0] for v in named.values() if len(v) == 1]

    def pick(seq):
        return seq[int(rng.integers(len(seq)))]

    if qtype == "color":
        cand = [v[0] for v in by_shape.values() if len(v) == 1]
        if not cand:
            return None
        o = pick(cand)
        return dict(question=f"what color is the {o.shape} ?", answer=o.color, relevant_tokens=o.tokens)
    if qtype == "shape":
        cand = [v[0] for v in by_color.values() if len(v) == 1]
        if not cand:
            return None
        o = pick(cand)
        return dict(question=f"what shape is the {o.color} object ?", answer=o.shape, relevant_tokens=o.tokens)
    if qtype == "count":
        # choose the answer first (uniform over the counts this scene offers), then the attribute
        cand = [(a, m) for a, m in list(by_color.items()) + list(by_shape.items()) if 1 <= len(m) <= len(COUNT_WORDS)]
        if not cand:
            return None
        counts = sorted({len(m) for _, m in cand})
        if counts == [1] and rng.random() < 0.6:  # scenes without repeats would make "1" dominate
            return None
        n = pick(counts)
        attr, match = pick([(a, m) for a, m in cand if len(m) == n])
        return dict(question=f"how many {attr} objects are there ?", answer=str(len(match)),
                    relevant_tokens=_toks(match))
    if qtype == "exists":
        if (rng.random() < 0.5) if want_yes is None else want_yes:
            o = pick(objs)
            return dict(question=f"is there a {o.color} {o.shape} ?", answer="yes", relevant_tokens=_toks(named[o.name]))
        absent = [(c, s) for c in COLORS for s in SHAPES if f"{c} {s}" not in named]
        # some hard negatives: colour and shape both present, but never together
        present_c, present_s = {o.color for o in objs}, {o.shape for o in objs}
        hard = [(c, s) for c, s in absent if c in present_c and s in present_s]
        c, s = pick(hard) if hard and rng.random() < HARD_NEGATIVE_P else pick(absent)
        near = [o for o in objs if o.color == c or o.shape == s] or objs  # nothing close: every object
        return dict(question=f"is there a {c} {s} ?", answer="no", relevant_tokens=_toks(near))
    if qtype in ("position", "size"):
        if not unique_named:
            return None
        o = pick(unique_named)
        # the shortest unambiguous reference: "the circle", "the red object" or "the red circle"
        if len(by_shape[o.shape]) == 1 and (len(by_color[o.color]) > 1 or rng.random() < 0.5):
            ref = f"the {o.shape}"
        elif len(by_color[o.color]) == 1:
            ref = f"the {o.color} object"
        else:
            ref = f"the {o.color} {o.shape}"
        if qtype == "position":
            return dict(question=f"where is {ref} ?", answer=o.quadrant, relevant_tokens=o.tokens)
        return dict(question=f"what size is {ref} ?", answer=o.size, relevant_tokens=o.tokens)
    raise ValueError(qtype)


def make_questions(scene: Scene, n: int, rng: np.random.Generator, types=QUESTION_TYPES,
                   balance: dict | None = None, per_type: int = 1) -> list[dict]:
    """Up to ``n`` distinct questions, at most ``per_type`` of each type (types in random order, each round
    visiting every type once), skipping types the scene does not allow.

    ``balance`` (a dict carried across calls) makes ``exists`` answers alternate yes/no exactly."""
    out, seen = [], set()
    for _ in range(per_type):
        for t in rng.permutation(len(types)):
            if len(out) >= n:
                return out
            want = None
            if balance is not None and types[int(t)] == "exists":
                want = not balance.get("exists_yes", False)
            q = make_question(scene, types[int(t)], rng, want)
            if q is not None and q["question"] not in seen:
                if want is not None:
                    balance["exists_yes"] = want
                seen.add(q["question"])
                out.append(dict(type=types[int(t)], **q))
    return out


def listing(scene: Scene) -> str:
    """Training-only text naming every object in raster order of its layout cell."""
    objs = sorted(scene.objects, key=lambda o: o.cell)
    return "list : " + " , ".join(f"{o.size} {o.name}" for o in objs) + " ."


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def generate_split(seed: int, n_images: int, questions_per_image: int, make=None):
    """Yield (scene, questions) pairs; deterministic in ``seed``. ``make(rng) -> Scene``: another scene
    family (default :func:`make_scene`)."""
    rng = np.random.default_rng(seed)
    balance: dict = {}
    for _ in range(n_images):
        scene = (make or make_scene)(rng)
        yield scene, make_questions(scene, questions_per_image, rng, balance=balance)


def write_split(out_dir: str | Path = DEFAULT_BENCH_DIR, seed: int = HELDOUT_SEED, n_images: int = HELDOUT_IMAGES,
                questions_per_image: int = HELDOUT_QUESTIONS_PER_IMAGE, make=None, scene_info=None,
                geometry: dict | None = None) -> Path:
    """Write PNG images, ``questions.jsonl`` and ``scenes.jsonl`` to ``out_dir``; returns the questions path.

    Another scene family passes ``make(rng) -> Scene``, ``scene_info(scene) -> (keys after "image" in its
    scenes.jsonl record, keys appended to each question)`` and ``geometry`` (meta.json's geometry keys)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    qlines, slines = [], []
    for i, (scene, qs) in enumerate(generate_split(seed, n_images, questions_per_image, make)):
        rel = f"images/{i:04d}.png"
        (out_dir / rel).write_bytes(png_bytes(scene.image))
        s_keys, q_keys = scene_info(scene) if scene_info else ({"grid": [GRID, GRID]}, {})
        slines.append(json.dumps({
            "image": rel, **s_keys, "object_tokens": scene.object_tokens(),
            "objects": [asdict(o) for o in scene.objects]}))
        for j, q in enumerate(qs):
            qlines.append(json.dumps({"id": f"{i:04d}-{j}", "image": rel, "question": q["question"],
                                      "answer": q["answer"], "type": q["type"],
                                      "relevant_tokens": list(q["relevant_tokens"]), **q_keys}))
    (out_dir / "questions.jsonl").write_text("\n".join(qlines) + "\n")
    (out_dir / "scenes.jsonl").write_text("\n".join(slines) + "\n")
    geometry = geometry or {"image_size": IMAGE_SIZE, "patch_size": PATCH, "grid": [GRID, GRID]}
    (out_dir / "meta.json").write_text(json.dumps({
        "seed": seed, "n_images": n_images, "questions_per_image": questions_per_image, **geometry,
        "question_types": list(QUESTION_TYPES)}, indent=1) + "\n")
    return out_dir / "questions.jsonl"


def load_split(bench_dir: str | Path = DEFAULT_BENCH_DIR) -> list[dict]:
    """Read ``questions.jsonl``; adds ``image_path`` (absolute) to each record."""
    bench_dir = Path(bench_dir)
    recs = [json.loads(line) for line in (bench_dir / "questions.jsonl").read_text().splitlines() if line.strip()]
    for r in recs:
        r["image_path"] = str(bench_dir / r["image"])
    return recs


if __name__ == "__main__":  # python -m vtprune.eval.embedded.generator [out_dir]
    import sys

    p = write_split(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_BENCH_DIR)
    print("wrote", p)
