"""Generic JSONL VQA benchmark (the format of vtprune's embedded synthetic benchmark).

Format: JSON Lines, one object per line::

    {"id": "q0001", "image": "images/0001.png", "question": "What colour is the square?",
     "answer": "red", "type": "color_of_shape", "relevant_tokens": [3, 4, 11], ...}

``id`` (str or int, unique), ``image`` (path relative to the JSONL file's folder, or ``image_root=``),
``question`` (str), ``answer`` (str, or a list of accepted strings) are required; ``type`` (str),
``choices`` (list of str), ``relevant_tokens`` (list of int: visual-token indices that hold the
evidence, for oracle policies) and any other keys are optional and kept in ``Sample.meta``.
``path`` may also be a folder: its ``benchmark.jsonl``, else its ``questions.jsonl`` (the layout of
``vtprune.eval.embedded``'s shipped split, next to ``scenes.jsonl`` and ``images/``), else its only
``*.jsonl``.

Metric: exact match after :func:`vtprune.eval.metrics.normalize_exact` (lowercase, trimmed
whitespace and edge punctuation); ``accuracy`` (= ``primary``), ``by_type`` (accuracy per ``type``) and
``n_by_type`` (questions per ``type``).
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ..metrics import exact_match
from .base import Benchmark, Layout, Need, Sample, SHORT_ANSWER_PROMPT, as_folder, format_error, iter_jsonl, require_path

#: The file names tried (in order) in a benchmark folder.
FILES = ("benchmark.jsonl", "questions.jsonl")
SOURCE = ("vtprune's embedded benchmark is generated, not downloaded: `python -m vtprune.eval.embedded.generator` "
          "writes assets/embedded/bench; any other JSONL of {id, image, question, answer} works")
EXPECTED = ('JSON Lines, one object per line: {"id": str|int, "image": "<relative path>", '
            '"question": str, "answer": str|[str], "type": str (optional), '
            '"relevant_tokens": [int] (optional)}')


class JSONLBenchmark(Benchmark):
    name = "embedded"

    @classmethod
    def load(cls, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             **kw) -> "JSONLBenchmark":
        p = require_path(path, EXPECTED)
        if p.is_dir():
            named = [p / n for n in FILES if (p / n).is_file()]
            files = named[:1] or sorted(p.glob("*.jsonl"))
            if len(files) != 1:
                raise format_error(p, None, f"{len(files)} candidate *.jsonl files in this folder",
                                   "a benchmark.jsonl, a questions.jsonl, or exactly one *.jsonl")
            p = files[0]
        root = Path(image_root) if image_root is not None else p.parent
        samples, first_line = [], {}
        for n, obj in iter_jsonl(p, EXPECTED):
            for key in ("id", "image", "question", "answer"):
                if key not in obj:
                    raise format_error(p, f"line {n}", f"missing key {key!r}", EXPECTED)
            if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
                raise format_error(p, f"line {n}", "id must be a string or an integer", EXPECTED)
            if not isinstance(obj["image"], str) or not isinstance(obj["question"], str):
                raise format_error(p, f"line {n}", "image and question must be strings", EXPECTED)
            ans = obj["answer"]
            if not (isinstance(ans, str) or (isinstance(ans, list) and ans
                                             and all(isinstance(a, str) for a in ans))):
                raise format_error(p, f"line {n}", "answer must be a string or a non-empty list of strings",
                                   EXPECTED)
            rel = obj.get("relevant_tokens")
            if rel is not None and not (isinstance(rel, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in rel)):
                raise format_error(p, f"line {n}", "relevant_tokens must be a list of integers", EXPECTED)
            choices = obj.get("choices")
            if choices is not None and not (isinstance(choices, list)
                                            and all(isinstance(c, str) for c in choices)):
                raise format_error(p, f"line {n}", "choices must be a list of strings", EXPECTED)
            sid = str(obj["id"])
            if sid in first_line:
                raise format_error(p, f"line {n}", f"id {sid!r} repeats line {first_line[sid]}", EXPECTED)
            first_line[sid] = n
            meta = {k: v for k, v in obj.items() if k not in ("id", "image", "question", "answer", "choices")}
            meta.setdefault("type", None)
            meta["line"] = n
            samples.append(Sample(id=sid, image=str(root / obj["image"]), question=obj["question"],
                                  answers=ans, choices=choices, meta=meta))
        return cls(samples, source=p, **kw)

    @classmethod
    def layout(cls, path, image_root=None, **kw) -> Layout:
        folder, file = as_folder(path, (".jsonl",))
        need = (Need(file, "file", "questions (JSON Lines)") if file is not None else
                Need(folder / FILES[1], "file", "questions (JSON Lines)", (folder / FILES[0], folder / "*.jsonl")))
        return Layout(Path(path), (need,), SOURCE)

    def prompt(self, sample: Sample) -> str:
        return f"{sample.question}\n{SHORT_ANSWER_PROMPT}"

    def _score(self, pairs):
        hits, by_type = [], defaultdict(list)
        for s, pred in pairs:
            ok = exact_match(pred, s.answers)
            hits.append(ok)
            if s.meta.get("type") is not None:
                by_type[str(s.meta["type"])].append(ok)
        out: dict = {"accuracy": sum(hits) / len(hits),
                     "by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
                     "n_by_type": {k: len(v) for k, v in sorted(by_type.items())}}
        out["primary"] = out["accuracy"]
        return out
