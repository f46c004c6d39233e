"""Validate every (model, method, budget) of a sweep against the model before the first cell runs.

Each unfinished cell's method is patched onto the model and removed again (``vtprune.patch`` checks
the family, layer indices, budgets against the model's visual tokens, parameter names and types).
Path models are built without weights (meta device, from their ``config.json``), so validating a
sweep of 7B models costs seconds, not a load of every checkpoint.
"""
from __future__ import annotations

from typing import Any, Sequence

from .config import Cell, SweepConfig


class SweepConfigError(ValueError):
    """The config asks for something a model cannot run; ``problems`` lists one line per entry."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(
            f"sweep config: {len(self.problems)} (model, method, budget) combination(s) cannot run; nothing was run "
            "or stored. Fix each entry (its parameter or budget), drop it, or restrict the method to the models "
            "it supports with `models: [NAME, ...]` in its entry:\n  - " + "\n  - ".join(self.problems))


def patch_args(cell: Cell) -> tuple[str, dict[str, Any]]:
    """``(spec, params)`` for ``vtprune.patch(model, spec, **params)`` of ``cell``."""
    m = cell.method
    if m.spec is not None:
        return m.spec.replace("{budget}", str(cell.budget)), {}
    params = dict(m.params)
    if m.budget_param is not None and cell.budget is not None:
        params[m.budget_param] = cell.budget
    return m.name, params


def validate_cells(cfg: SweepConfig, cells: Sequence[Cell]) -> None:
    """Patch-and-remove each distinct (model, method, budget) of ``cells``; raise :class:`SweepConfigError`."""
    import vtprune

    from .models import model_skeleton

    problems: list[str] = []
    for entry in cfg.models:
        mine = [c for c in cells if c.model is entry]
        if not mine:
            continue
        try:
            model = model_skeleton(entry, cfg)
        except Exception as exc:  # noqa: BLE001 - reported with the entry that names the model
            problems.append(f"{entry.where} ({entry.name!r}): cannot read the model's configuration: "
                            f"{type(exc).__name__}: {exc}")
            continue
        seen: set = set()
        for cell in mine:
            if (cell.method.label, cell.budget) in seen:
                continue
            seen.add((cell.method.label, cell.budget))
            spec, params = patch_args(cell)
            try:
                vtprune.patch(model, spec, seed=cfg.seed, **params).remove()
            except (ValueError, TypeError) as exc:
                budget = "" if cell.budget is None else f" at budget {cell.budget!r}"
                problems.append(f"{cell.method.where} ({cell.method.label!r}){budget} on model {entry.name!r}: {exc}")
        del model
    if problems:
        raise SweepConfigError(problems)
