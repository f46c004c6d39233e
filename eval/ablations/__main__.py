"""``python -m vtprune.eval.ablations NAME [--model M] [--benchmark LOADER=PATH] [--out DIR]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import ABLATIONS, ablation_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vtprune.eval.ablations",
        description="Runs one ablation (a sweep over one method's knobs) and writes its report. "
                    "--list shows the ablations.")
    ap.add_argument("name", nargs="?", choices=sorted(ABLATIONS), help="the ablation to run")
    ap.add_argument("--list", action="store_true", help="list the ablations")
    ap.add_argument("--model", default=None,
                    help="embedded (default; embedded-anyres for globalcom2), tiny-llava, ... or a local HF checkpoint")
    ap.add_argument("--benchmark", default=None, help="LOADER=PATH (default: the embedded model's held-out split)")
    ap.add_argument("--limit", type=int, default=None, metavar="N", help="first N samples of the benchmark")
    ap.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per generate() (default: 8)")
    ap.add_argument("--out", default=None, help="output folder (default runs/ablation-NAME)")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, ab in ABLATIONS.items():
            print(f"{name:12s} {ab['about']}")
        return 0
    from vtprune.eval.report import make_report
    from vtprune.eval.sweep import CellsFailedError, run_sweep

    out = Path(args.out or f"runs/ablation-{args.name}")
    store = out / "results.jsonl"
    rc = 0
    try:
        cfg = ablation_config(args.name, model=args.model, benchmark=args.benchmark, limit=args.limit,
                              batch_size=args.batch_size)
        run_sweep(cfg, store)
    except (ValueError, FileNotFoundError) as exc:  # config problems: nothing ran
        print(f"vtprune ablation {args.name}: error: {exc}", file=sys.stderr)
        return 2
    except CellsFailedError as exc:  # the other cells ran: report them
        print(f"vtprune ablation {args.name}: {exc}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print(f"\nvtprune ablation {args.name}: interrupted; the results so far are kept in {store}; "
              "run the same command to resume.", file=sys.stderr)
        return 130
    make_report(store, out / "report")
    print(f"results: {store}\nreport: {out / 'report' / 'results.md'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
