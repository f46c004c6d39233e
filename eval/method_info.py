"""What ``vtprune methods`` prints: each registered method's stage, families, parameters and paper.

Everything is read from the registered policy classes (:func:`vtprune.registry.registered`): the
stages of the parts a default instance expands into, the class's ``families`` and ``description``,
its dataclass fields (name, type, default); the paper line is the first sentence of the method
module's docstring.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass

#: Fields every stage-P method has, left out of the table's "main parameters" (shown by ``methods NAME``).
_COMMON = ("positions", "quota")


@dataclass
class Param:
    name: str
    type: str
    default: object

    def default_text(self) -> str:
        d = self.default
        if isinstance(d, (tuple, list)):
            return "|".join(str(x) for x in d)  # the spec-string syntax for lists
        return str(d)


@dataclass
class MethodInfo:
    name: str
    stage: str            # e.g. "P", or "P+D" for a method whose default runs two stages
    families: tuple
    description: str
    paper: str
    params: list[Param]

    def main_params(self, limit: int = 3) -> str:
        shown = [p for p in self.params if p.name not in _COMMON]
        text = ", ".join(f"{p.name}={p.default_text()}" for p in shown[:limit])
        return text + (", ..." if len(shown) > limit else "")


def first_sentence(text: str) -> str:
    """The first sentence of a docstring's first paragraph (``et al.``, ``e.g.`` do not end it)."""
    para = " ".join(text.strip().split("\n\n")[0].split())
    m = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)\.(\s|$)", para)
    return para[:m.start() + 1] if m else para


def method_info(cls) -> MethodInfo:
    """:class:`MethodInfo` of a registered policy class."""
    try:
        stage = "+".join(dict.fromkeys(p.stage for p in cls().parts()))
    except Exception:  # noqa: BLE001 - a method without usable defaults: its declared stage
        stage = cls.stage
    params = [Param(f.name, str(f.type), f.default if f.default is not dataclasses.MISSING else
                    (f.default_factory() if f.default_factory is not dataclasses.MISSING else None))
              for f in dataclasses.fields(cls)]
    doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or cls.__doc__ or ""
    return MethodInfo(cls.name, stage, tuple(cls.families), cls.description, first_sentence(doc), params)


def all_methods() -> list[MethodInfo]:
    from vtprune.registry import registered

    return [method_info(cls) for cls in registered().values()]


def _families(fams: tuple) -> str:
    from vtprune.policy import FAMILIES

    return "all" if set(fams) == set(FAMILIES) else ", ".join(fams)


def format_table(infos: list[MethodInfo]) -> str:
    """A plain-text table: name, stage, families, main parameters with defaults, description."""
    rows = [("name", "stage", "families", "main parameters (defaults)", "description")]
    rows += [(i.name, i.stage, _families(i.families), i.main_params(), i.description) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(r[4]))
    return "\n".join(lines)


def format_detail(info: MethodInfo) -> str:
    """Everything about one method: stage, families, paper, description, every parameter."""
    w = max([len(p.name) for p in info.params] + [4])
    tw = max([len(p.type) for p in info.params] + [4])
    out = [f"{info.name}: {info.description}", "",
           f"stage:     {info.stage}  (V: inside the vision encoder, P: before the LLM, D: inside the LLM)",
           f"families:  {', '.join(info.families)}",
           f"paper:     {info.paper}", "",
           "parameters (spec string: NAME:key=value,key=value; lists as a|b|c):",
           f"  {'name'.ljust(w)}  {'type'.ljust(tw)}  default"]
    out += [f"  {p.name.ljust(w)}  {p.type.ljust(tw)}  {p.default_text()}" for p in info.params]
    return "\n".join(out)
