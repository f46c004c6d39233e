"""Image-text retrieval on a Karpathy split file (COCO / Flickr30k ``dataset_*.json``).

Format: ``{"images": [{"filename": str, "filepath": str (optional, COCO), "split": "train"|"val"|
"test"|"restval", "sentences": [{"raw": str, ...}, ...], ...}]}``. Images are
``<image_root>/<filepath>/<filename>`` (``image_root`` defaults to ``<dir>/images`` if it exists, else
``<dir>``). One :class:`Sample` per image of ``split`` (id = ``imgid``/``cocoid`` if present, else
the file name); ``answers`` = its captions. ``texts`` lists every caption in order and
``text_to_image[j]`` the sample index of caption ``j``.

Metrics: recall@1/5/10 image->text and text->image
(:func:`vtprune.eval.metrics.retrieval_recall`) from a similarity matrix ``[n_images, n_texts]``
(``score_similarity``) or from ``score({image_id: similarities to all texts})``;
``primary`` = ``mean_recall``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from ..metrics import retrieval_recall
from .base import (Benchmark, Layout, Need, Sample, format_error, json_path, pick_dir, read_json, require_path)

IMAGE_DIR = "images"
SOURCE = ("Karpathy splits (cs.stanford.edu/people/karpathy/deepimagesent, caption_datasets.zip): "
          "dataset_flickr30k.json or dataset_coco.json; images: Flickr30k (from its authors, flickr30k-images) or "
          "COCO 2014 (cocodataset.org), unpacked as images/ next to the JSON (COCO keeps its val2014/ and "
          "train2014/ sub-folders)")
EXPECTED = ('{"images": [{"filename": str, "filepath": str (optional), "split": str, '
            '"sentences": [{"raw": str}, ...]}]} (Karpathy dataset_<name>.json)')


class KarpathyRetrieval(Benchmark):
    name = "retrieval"

    @classmethod
    def load(cls, path: str | os.PathLike, split: str = "test",
             image_root: str | os.PathLike | None = None, **kw) -> "KarpathyRetrieval":
        p = require_path(path, EXPECTED, kind="file")
        data = read_json(p, EXPECTED)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise format_error(p, json_path("images"), "missing or not a list", EXPECTED)
        root = Path(image_root) if image_root is not None else pick_dir([p.parent / IMAGE_DIR, p.parent])
        samples, texts, t2i = [], [], []
        for i, im in enumerate(data["images"]):
            if not isinstance(im, dict):
                raise format_error(p, json_path("images", i), "not an object", EXPECTED)
            if not isinstance(im.get("filename"), str):
                raise format_error(p, json_path("images", i, "filename"), "missing or not a string", EXPECTED)
            if im.get("split") != split:
                continue
            sents = im.get("sentences")
            if not isinstance(sents, list) or not sents:
                raise format_error(p, json_path("images", i, "sentences"), "missing or empty", EXPECTED)
            caps = []
            for j, s in enumerate(sents):
                if not isinstance(s, dict) or not isinstance(s.get("raw"), str):
                    raise format_error(p, json_path("images", i, "sentences", j, "raw"),
                                       "missing or not a string", EXPECTED)
                caps.append(s["raw"])
            sid = str(im.get("cocoid", im.get("imgid", im["filename"])))
            path_img = root / im.get("filepath", "") / im["filename"]
            samples.append(Sample(id=sid, image=str(path_img), question="", answers=caps,
                                  meta={"filename": im["filename"], "first_text": len(texts)}))
            t2i.extend([len(samples) - 1] * len(caps))
            texts.extend(caps)
        if not samples:
            raise format_error(p, json_path("images"), f"no image with split {split!r}", EXPECTED)
        bench = cls(samples, source=p, split=split, **kw)
        bench.texts, bench.text_to_image = texts, t2i
        return bench

    @classmethod
    def layout(cls, path, split: str = "test", image_root=None, **kw) -> Layout:
        p = Path(path)
        needs = (Need(p, "file", "Karpathy split file (JSON)"),
                 Need(Path(image_root), "dir", "images") if image_root is not None else
                 Need(p.parent / IMAGE_DIR, "dir", "the images of the split file (<filepath>/<filename>)",
                      (p.parent / "*.jpg",)))
        return Layout(p, needs, SOURCE)

    def subset(self, *a, **kw):
        raise NotImplementedError("retrieval ranks against the whole gallery; subsets are not supported")

    def prompt(self, sample: Sample) -> str:
        return "Describe the image in one sentence."

    def score_similarity(self, similarity, ks: Sequence[int] = (1, 5, 10)) -> dict:
        """Recall@k from ``similarity[n_images, n_texts]`` (rows in ``samples`` order, cols ``texts``)."""
        out = retrieval_recall(similarity, self.text_to_image, ks)
        out.update(primary=out["mean_recall"], n=len(self.samples), n_texts=len(self.texts))
        return out

    def score(self, predictions: Mapping[str, Sequence[float]]) -> dict:  # type: ignore[override]
        """``predictions[image_id]`` = similarities of that image to every text in ``texts``."""
        missing = [s.id for s in self.samples if s.id not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} images have no similarity row (first: {missing[0]!r})")
        return self.score_similarity([list(predictions[s.id]) for s in self.samples])
