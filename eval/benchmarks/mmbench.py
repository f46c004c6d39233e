"""MMBench (dev/test TSV of the official release, EN or CN).

Format: a TAB-separated file with a header row. Columns: ``index`` (int), ``question``, ``hint``
(optional), option columns ``A``, ``B`` (required), ``C``, ``D``, ... (optional; empty/``nan`` = no
such option), ``answer`` (a letter; absent in the test split), ``category`` (optional), and ``image``
(base64 PNG/JPEG, or a row index whose image to reuse, as VLMEvalKit writes duplicates) or
``image_path``. Fields may be quoted (standard CSV quoting). Images are decoded on demand.

Circular evaluation (``circular=True``): each question is asked once per rotation of its options
(A..D -> B..D,A ...) and counts only if every rotation is right. Rotations are generated here with
ids ``index + k * 1_000_000`` (the legacy convention), or taken from the file when it already holds
such rows (index >= 1e6). With ``circular=False`` those extra rows are dropped.

Prompt (LLaVA's): ``<hint>\\n<question>\\nA. ..\\nB. ..\\n`` + "Answer with the option's letter from
the given choices directly.". Metric: choice accuracy after
:func:`vtprune.eval.metrics.parse_choice_letter`; ``accuracy`` (per row), ``circular_accuracy``
(per question, when circular), ``by_category``; ``primary`` = circular accuracy when circular.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from ..metrics import parse_choice_letter
from .base import (Base64Image, Benchmark, CHOICE_PROMPT, Layout, Need, Sample, choice_letters, format_choices,
                   format_error, require_path)

SOURCE = ("MMBench (github.com/open-compass/MMBench): the dev TSVs with answers, mmbench_dev_20230712.tsv (EN) and "
          "mmbench_dev_cn_20231003.tsv (CN), as released by OpenCompass (images are base64 inside the TSV)")
EXPECTED = ("a TAB-separated file with header: index, question, [hint], A, B, [C, D, ...], [answer], "
            "[category], image (base64) or image_path")
_CIRC = 1_000_000
_NONE = ("", "nan", "NaN", "none", "None")


def _missing(v: str | None) -> bool:
    return v is None or v.strip() in _NONE


class MMBench(Benchmark):
    name = "mmbench"

    @classmethod
    def load(cls, path: str | os.PathLike, circular: bool = False,
             image_root: str | os.PathLike | None = None, **kw) -> "MMBench":
        p = require_path(path, EXPECTED, kind="file")
        csv.field_size_limit(2**31 - 1)
        rows = []
        with open(p, "r", encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            try:
                header = next(reader)
            except StopIteration:
                raise format_error(p, "line 1", "empty file", EXPECTED) from None
            except csv.Error as exc:
                raise format_error(p, "line 1", f"unreadable header ({exc})", EXPECTED) from exc
            header = [h.strip() for h in header]
            col = {h: i for i, h in enumerate(header)}
            for need in ("index", "question", "A", "B"):
                if need not in col:
                    raise format_error(p, "line 1 (header)", f"no {need!r} column", EXPECTED)
            if "image" not in col and "image_path" not in col:
                raise format_error(p, "line 1 (header)", "no 'image' or 'image_path' column", EXPECTED)
            letters = []
            for l in choice_letters(26):
                if l not in col:
                    break
                letters.append(l)
            r = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    raise format_error(p, f"TSV row {r + 1} (line {reader.line_num})", f"unreadable ({exc})",
                                       EXPECTED) from exc
                r += 1
                if not any(c.strip() for c in cells):
                    continue
                where = f"TSV row {r} (line {reader.line_num})"
                if len(cells) != len(header):
                    raise format_error(p, where, f"{len(cells)} fields, header has {len(header)}", EXPECTED)
                get = lambda k: cells[col[k]] if k in col else None  # noqa: E731
                try:
                    index = int(float(get("index")))
                except ValueError:
                    raise format_error(p, where, f"index {get('index')!r} is not an integer", EXPECTED) from None
                options = []
                for l in letters:
                    v = get(l)
                    if _missing(v):
                        break
                    options.append(v)
                if len(options) < 2:
                    raise format_error(p, where, "fewer than two options (A, B)", EXPECTED)
                answer = get("answer")
                answer = None if _missing(answer) else answer.strip()
                if answer is not None and answer not in choice_letters(len(options)):
                    raise format_error(p, where, f"answer {answer!r} is not one of the option letters",
                                       EXPECTED)
                rows.append({"index": index, "where": where, "question": get("question"),
                             "hint": None if _missing(get("hint")) else get("hint"),
                             "options": options, "answer": answer,
                             "category": get("category"), "l2_category": get("l2-category"),
                             "split": get("split"), "image": get("image"), "image_path": get("image_path")})
        by_index = {}
        for row in rows:
            if row["index"] in by_index:
                raise format_error(p, row["where"], f"index {row['index']} repeats", EXPECTED)
            by_index[row["index"]] = row
        has_copies = any(row["index"] >= _CIRC for row in rows)
        root = Path(image_root) if image_root is not None else p.parent
        samples = []
        for row in rows:
            if row["index"] >= _CIRC and not circular:
                continue
            image = cls._image(p, row, by_index, root)
            meta = {"index": row["index"], "group": row["index"] % _CIRC, "hint": row["hint"],
                    "category": row["category"], "l2_category": row["l2_category"], "split": row["split"],
                    "rotation": row["index"] // _CIRC}
            samples.append(Sample(id=str(row["index"]), image=image, question=row["question"],
                                  answers=row["answer"] or "", choices=row["options"], meta=meta))
            if circular and not has_copies:
                n = len(row["options"])
                for k in range(1, n):
                    opts = row["options"][k:] + row["options"][:k]
                    ans = ""
                    if row["answer"]:
                        ans = choice_letters(n)[(choice_letters(n).index(row["answer"]) - k) % n]
                    idx = row["index"] + k * _CIRC
                    samples.append(Sample(id=str(idx), image=image, question=row["question"], answers=ans,
                                          choices=opts, meta={**meta, "index": idx, "rotation": k}))
        return cls(samples, source=p, circular=circular, **kw)

    @classmethod
    def layout(cls, path, circular: bool = False, image_root=None, **kw) -> Layout:
        return Layout(Path(path), (Need(Path(path), "file", "MMBench TSV (base64 images inside)"),), SOURCE)

    @staticmethod
    def _image(p: Path, row: dict, by_index: dict, root: Path):
        if row["image_path"] and not _missing(row["image_path"]):
            return str(root / row["image_path"])
        data = row["image"] or ""
        seen = set()
        while data.strip().isdigit() and len(data.strip()) <= 64:  # a reference to another row's image
            ref = int(data.strip())
            if ref in seen or ref not in by_index:
                raise format_error(p, row["where"], f"image refers to missing row index {ref}", EXPECTED)
            seen.add(ref)
            data = by_index[ref]["image"] or ""
        if _missing(data):
            raise format_error(p, row["where"], "empty image field", EXPECTED)
        return Base64Image(data, source=f"{p}: {row['where']}")

    def prompt(self, sample: Sample) -> str:
        hint = sample.meta.get("hint")
        q = f"{hint}\n{sample.question}" if hint else sample.question
        return f"{q}\n{format_choices(sample.choices)}\n{CHOICE_PROMPT}"

    def _score(self, pairs):
        if any(not s.answers for s, _ in pairs):
            raise ValueError(f"{self.source}: some rows have no answer (test split?); cannot score")
        groups: dict[int, list[float]] = defaultdict(list)
        cat: dict[int, str] = {}
        hits = []
        for s, pred in pairs:
            i = parse_choice_letter(pred, choices=s.choices)
            ok = float(i is not None and choice_letters(len(s.choices))[i] == s.answers)
            hits.append(ok)
            groups[s.meta["group"]].append(ok)
            cat.setdefault(s.meta["group"], s.meta.get("category") or "")
        out: dict = {"accuracy": sum(hits) / len(hits)}
        circular = bool(self.options.get("circular"))
        per_group = {g: float(all(v)) for g, v in groups.items()}
        by_cat: dict[str, list[float]] = defaultdict(list)
        if circular:
            for g, v in per_group.items():
                by_cat[cat[g]].append(v)
        else:
            for (s, _), ok in zip(pairs, hits):
                by_cat[s.meta.get("category") or ""].append(ok)
        if circular:
            out["circular_accuracy"] = sum(per_group.values()) / len(per_group)
        out["by_category"] = {k: sum(v) / len(v) for k, v in sorted(by_cat.items()) if k}
        out["primary"] = out["circular_accuracy"] if circular else out["accuracy"]
        return out
