"""The ``vtprune`` command line.

    vtprune methods            list the registered methods
    vtprune demo               patch a tiny random LLaVA and generate with every baseline method
"""
from __future__ import annotations

import argparse
import sys
import time


def _cmd_methods(args) -> int:
    import vtprune

    for name, desc in vtprune.methods().items():
        print(f"{name:14s} {desc}")
    return 0


def _cmd_demo(args) -> int:
    import torch

    import vtprune
    from vtprune.testing import BUILDERS, make_inputs, tiny_images

    torch.set_num_threads(1)
    model, proc = BUILDERS[args.family]()
    sizes = None if args.family == "llava" else [(56, 56), (70, 112)]
    inputs = make_inputs(args.family, proc, ["what is in the picture?", "how many objects?"], tiny_images(2, sizes=sizes))
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
    print(f"tiny random {args.family} (no downloads), batch of 2 with left padding, {args.new_tokens} new tokens")
    print(f"{'method':34s} {'visual/img':>10s} {'LLM tokens per layer (sample 0)':>34s} {'same ids as vanilla':>20s} {'ms':>7s}")
    for spec in args.methods:
        with vtprune.patch(model, spec, seed=0) as h:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            ms = (time.perf_counter() - t0) * 1e3
            st = h.stats
        same = torch.equal(out, ref) if out.shape == ref.shape else False
        print(f"{spec:34s} {str(st.visual_tokens_per_image):>10s} {str(st.schedules[0].llm_tokens_per_layer):>34s} "
              f"{str(same):>20s} {ms:7.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("methods", help="list registered methods")
    p.set_defaults(fn=_cmd_methods)
    p = sub.add_parser("demo", help="patched generate() on a tiny random model (no downloads)")
    p.add_argument("--family", default="llava", choices=["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=["none", "random:keep=8", "pool:keep=4", "fastv:layer=2,keep=0.5",
                                                    "random:keep=8 + fastv:layer=2,keep=0.5"])
    p.set_defaults(fn=_cmd_demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
