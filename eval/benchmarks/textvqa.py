"""TextVQA (val 0.5.1 by default).

Format: the official JSON ``{"dataset_name": "textvqa", "data": [{"question_id": int, "image_id": str,
"question": str, "answers": [10 strings], ...}]}`` (``TextVQA_0.5.1_val.json``). ``path`` is that file
or a folder holding it. Images are ``<image_root>/<image_id>.jpg``; ``image_root`` defaults to the
first existing of ``<dir>/train_images`` (val images live there), ``<dir>/images``, ``<dir>``.
The test split (no ``answers``) loads, but cannot be scored.

Metric: the standard VQA accuracy (:func:`vtprune.eval.metrics.vqa_accuracy`, answers normalised
as the official evaluation does), averaged over questions = ``accuracy`` = ``primary``.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..metrics import vqa_accuracy
from .base import (Benchmark, Layout, Need, Sample, as_folder, format_error, json_path, pick_dir, read_json,
                   require_path)

#: The default annotations file (val 0.5.1) and the image folders tried in order (val images live in train_images/).
VAL_FILE = "TextVQA_0.5.1_val.json"
IMAGE_DIRS = ("train_images", "images")
SOURCE = ("TextVQA 0.5.1 (textvqa.org/dataset): TextVQA_0.5.1_val.json and train_val_images.zip, unpacked as "
          "train_images/ next to it")
EXPECTED = ('{"data": [{"question_id": int, "image_id": str, "question": str, "answers": [str, ...]}]} '
            "(TextVQA_0.5.1_<split>.json)")


class TextVQA(Benchmark):
    name = "textvqa"

    @classmethod
    def load(cls, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             image_ext: str = ".jpg", **kw) -> "TextVQA":
        p = require_path(path, EXPECTED)
        if p.is_dir():
            cands = [p / VAL_FILE, *sorted(p.glob("TextVQA*.json"))]
            p = next((c for c in cands if c.is_file()), cands[0])
        data = read_json(p, EXPECTED)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise format_error(p, json_path("data"), "missing or not a list", EXPECTED)
        root = Path(image_root) if image_root is not None else pick_dir(
            [*(p.parent / d for d in IMAGE_DIRS), p.parent])
        samples = []
        for i, item in enumerate(data["data"]):
            if not isinstance(item, dict):
                raise format_error(p, json_path("data", i), "not an object", EXPECTED)
            for key, typ in (("question_id", (int, str)), ("image_id", str), ("question", str)):
                if not isinstance(item.get(key), typ):
                    raise format_error(p, json_path("data", i, key), "missing or wrong type", EXPECTED)
            answers = item.get("answers", [])
            if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
                raise format_error(p, json_path("data", i, "answers"), "not a list of strings", EXPECTED)
            meta = {k: item[k] for k in ("image_id", "image_classes", "set_name") if k in item}
            samples.append(Sample(id=str(item["question_id"]),
                                  image=str(root / f"{item['image_id']}{image_ext}"),
                                  question=item["question"], answers=list(answers), meta=meta))
        return cls(samples, source=p, **kw)

    @classmethod
    def layout(cls, path, image_root=None, **kw) -> Layout:
        folder, file = as_folder(path)
        needs = [Need(file, "file", "TextVQA annotations (JSON)") if file is not None else
                 Need(folder / VAL_FILE, "file", "TextVQA val annotations (JSON)", (folder / "TextVQA*.json",))]
        needs.append(Need(Path(image_root), "dir", "TextVQA images") if image_root is not None else
                     Need(folder / IMAGE_DIRS[0], "dir", "TextVQA train/val images (<image_id>.jpg)",
                          (folder / IMAGE_DIRS[1], folder / "*.jpg")))
        return Layout(Path(path), tuple(needs), SOURCE)

    def _score(self, pairs):
        if any(not s.answers for s, _ in pairs):
            raise ValueError(f"{self.source}: some questions have no answers (test split?); cannot score")
        acc = [vqa_accuracy(pred, s.answers) for s, pred in pairs]
        out = {"accuracy": sum(acc) / len(acc)}
        out["primary"] = out["accuracy"]
        return out
