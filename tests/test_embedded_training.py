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
        resized, n = T.at_resolution(scene, size)
        assert n == g * g and resized.image is scene.image
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
    assert T.at_resolution(scene, G.IMAGE_SIZE) == (scene, M.N_IMAGE_TOKENS)
