"""``python -m vtprune.eval.ablations NAME [--model M] [--benchmark LOADER=PATH] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ABLATIONS, ablation_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vtprune.eval.ablations", description=__doc__)
    ap.add_argument("name", nargs="?", choices=sorted(ABLATIONS))
    ap.add_argument("--list", action="store_true", help="list the ablations")
    ap.add_argument("--model", default="embedded", help="embedded (default), tiny-llava, ... or a local HF checkpoint")
    ap.add_argument("--benchmark", default=None, help="LOADER=PATH (default: the embedded benchmark)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="output folder (default runs/ablation-NAME)")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, ab in ABLATIONS.items():
            print(f"{name:12s} {ab['about']}")
        return 0
    from vtprune.eval.report import make_report
    from vtprune.eval.sweep import run_sweep

    cfg = ablation_config(args.name, model=args.model, benchmark=args.benchmark, limit=args.limit,
                          batch_size=args.batch_size)
    out = Path(args.out or f"runs/ablation-{args.name}")
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"
    run_sweep(cfg, store)
    make_report(store, out / "report")
    print(f"results: {store}\nreport: {out / 'report' / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
