"""The embedded models' training-only per-patch targets (``scripts/train_embedded.py``'s auxiliary loss)
name what is really on each visual token: the object's attributes on its patches, one centre token per
object, background elsewhere, on both the single-view and the AnyRes layouts."""
import sys
from functools import partial
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_embedded as T  # noqa: E402
import train_embedded_anyres as TA  # noqa: E402
from vtprune.eval.embedded import anyres as A  # noqa: E402
from vtprune.eval.embedded import generator as G  # noqa: E402
from vtprune.eval.embedded import model as M  # noqa: E402

FIELDS = ("color", "shape", "size", "quadrant", "centre")


def _check(scene, targets, vocab, n, centre_of):
    inv = {i: w for w, i in vocab.items()}
    words = [[inv[t] for t in row] for row in targets]
    assert all(len(row) == n for row in words)
    owners = {}
    for o in scene.objects:
        for t in o.tokens:
            owners.setdefault(t, []).append(o)
    for k, f in enumerate(FIELDS[:4]):
        for t, objs in owners.items():  # a patch two objects touch (small images) names one of them
            assert words[k][t] in {getattr(o, f) for o in objs}
        assert all(words[k][t] == "." for t in range(n) if t not in owners)
    centres = [t for t in range(n) if words[4][t] == "object"]
    assert sorted(centres) == sorted({centre_of(o) for o in scene.objects})
    assert all(centre_of(o) in o.tokens for o in scene.objects)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_single_view_targets(seed):
    vocab = M.build_tokenizer().get_vocab()
    for scene in T.scenes_for(seed, 20):
        targets = T.patch_targets(scene, vocab, fields=FIELDS)
        _check(scene, targets, vocab, M.N_IMAGE_TOKENS, T.centre_token)
        assert sum(w == vocab["object"] for w in targets[4]) == len(scene.objects)


def test_anyres_targets_and_base_view_centres():
    vocab = A.build_tokenizer().get_vocab()
    for scene in A.scenes_for(5, 12):
        size = TA.image_size(scene)
        n = len(A.token_views(*size))
        centre_of = partial(TA.base_centre, size=size)
        targets = T.patch_targets(scene, vocab, n=n, fields=FIELDS, centre_of=centre_of)
        _check(scene, targets, vocab, n, centre_of)
        assert all(centre_of(o) < A.SIDE * A.SIDE for o in scene.objects)  # the base view's tokens


def test_tokens_at_the_native_size_are_the_generators():
    """object_tokens_at reproduces the generator's own rule at 112 px, so other sizes use the same rule."""
    for scene in T.scenes_for(4, 60):
        for o in scene.objects:
            assert T.object_tokens_at(o, G.IMAGE_SIZE) == o.tokens
            assert T.centre_token(o) in o.tokens


@pytest.mark.parametrize("size", [84, 140])
def test_resized_scene_targets(size):
    """A scene at another image size: (size/14)^2 tokens, each object on the patches its resized mask covers,
    one centre token per object, the other fields unchanged; the image and the answers are the scene's."""
    vocab = M.build_tokenizer().get_vocab()
    g = size // G.PATCH
    for scene in T.scenes_for(5, 30):
        resized, n = T.at_resolution(scene, size), g * g
        assert resized.image is scene.image
        for a, b in zip(scene.objects, resized.objects):
            assert (a.color, a.shape, a.size, a.quadrant) == (b.color, b.shape, b.size, b.quadrant)
            assert b.tokens and all(0 <= t < n for t in b.tokens)
            # the object's patches sit in its quadrant of the resized grid, as on the native grid
            rows = {t // g for t in b.tokens}
            cols = {t % g for t in b.tokens}
            assert (min(rows) >= g / 2 - 1 if a.quadrant.startswith("bottom") else max(rows) <= g / 2)
            assert (min(cols) >= g / 2 - 1 if a.quadrant.endswith("right") else max(cols) <= g / 2)
        centre_of = partial(T.centre_token, size=size)
        _check(resized, T.patch_targets(resized, vocab, n=n, fields=FIELDS, centre_of=centre_of), vocab, n, centre_of)
    assert T.at_resolution(scene, G.IMAGE_SIZE) is scene


@pytest.mark.parametrize("size", [140, 168])
def test_canvas_scene_targets(size):
    """A scene centred on a bigger canvas: the same objects at the same pixel size, their tokens the
    generator's rule on the canvas's patch grid (the scene's tokens shifted by the margin), the scene's
    pixels unchanged in the middle, answers unchanged, one centre token per object."""
    import numpy as np

    vocab = M.build_tokenizer().get_vocab()
    g, off = size // G.PATCH, (size - G.IMAGE_SIZE) // 2
    for i, scene in enumerate(T.scenes_for(6, 30)):
        canvas = T.on_canvas(scene, size, np.random.default_rng(i))
        assert canvas.image.size == (size, size)
        inner = np.asarray(canvas.image)[off:off + G.IMAGE_SIZE, off:off + G.IMAGE_SIZE]
        assert np.array_equal(inner, np.asarray(scene.image))
        assert G.listing(canvas) == G.listing(scene)
        for a, b in zip(scene.objects, canvas.objects):
            assert (a.color, a.shape, a.size, a.quadrant, a.cell) == (b.color, b.shape, b.size, b.quadrant, b.cell)
            mask = np.zeros((size, size))
            mask[off:off + G.IMAGE_SIZE, off:off + G.IMAGE_SIZE] = np.asarray(T.object_mask(a), dtype=np.float64) / 255
            assert b.tokens == G.mask_tokens(mask, *b.center)
        centre_of = partial(T.moved_centre_token, size=size)
        _check(canvas, T.patch_targets(canvas, vocab, n=g * g, fields=FIELDS, centre_of=centre_of), vocab, g * g,
               centre_of)
    with pytest.raises(ValueError, match="multiple of 28"):
        T.on_canvas(scene, 126, np.random.default_rng(0))


def test_crop_view_targets():
    """A crop view: the 56 px window of the scene's image holding all of its objects, each object's tokens the
    generator's rule on the crop's patch grid, position answers the crop's quadrants; scenes whose objects no
    window holds have none."""
    import numpy as np

    vocab = M.build_tokenizer().get_vocab()
    px = T.CROP_CELLS * G.CELL
    g = px // G.PATCH
    seen = 0
    for scene in T.scenes_for(7, 80):
        crop = T.crop_view(scene)
        rows = [o.cell[0] for o in scene.objects]
        cols = [o.cell[1] for o in scene.objects]
        if crop is None:
            assert max(rows) - min(rows) >= T.CROP_CELLS or max(cols) - min(cols) >= T.CROP_CELLS
            continue
        seen += 1
        assert crop.image.size == (px, px)
        x0, y0 = scene.objects[0].center[0] - crop.objects[0].center[0], scene.objects[0].center[1] - crop.objects[0].center[1]
        assert np.array_equal(np.asarray(crop.image), np.asarray(scene.image)[y0:y0 + px, x0:x0 + px])
        assert G.listing(crop) == G.listing(scene)
        for a, b in zip(scene.objects, crop.objects):
            assert (a.color, a.shape, a.size) == (b.color, b.shape, b.size)
            mask = np.asarray(T.object_mask(a), dtype=np.float64)[y0:y0 + px, x0:x0 + px] / 255
            assert b.tokens == G.mask_tokens(mask, *b.center)
            top, left = b.center[1] < px / 2, b.center[0] < px / 2
            assert b.quadrant == ("top" if top else "bottom") + "-" + ("left" if left else "right")
        centre_of = partial(T.moved_centre_token, size=px)
        _check(crop, T.patch_targets(crop, vocab, n=g * g, fields=FIELDS, centre_of=centre_of), vocab, g * g, centre_of)
    assert seen >= 10
