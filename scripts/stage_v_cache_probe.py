#!/usr/bin/env python
"""Why a stage-V method's merging costs more between encoder layers than on its own (issue #13).

Not a test: it prints times side by side, it asserts nothing.

PiToMe merges after every CLIP layer. Its 23 ``after_layer`` calls take longer inside the encoder than
the same calls replayed back to back on the same inputs. This script separates the causes on the
LLaVA-1.5 shape (random weights, bf16, 1 thread on CPU):

1. ``in situ``: the calls as ``generate()`` makes them (a CLIP layer between two calls);
2. ``replay``: the captured inputs of those calls, replayed back to back (caches warm);
3. ``replay, caches flushed``: before each call, a read of a buffer larger than the last-level cache;
4. ``replay, flushed, kernels re-run``: after the flush, the same policy steps on a tiny input (the code
   and the interpreter's objects are warm again, the large tensors are not).

If (3) is close to (1) the in-situ cost is cache refills; if (4) is close to (2) those refills are the
code path (libtorch kernels, dispatcher, Python), not the tensors' data.

    python scripts/stage_v_cache_probe.py               # keep 64, ~2 min on a quiet 2-core CPU
    python scripts/stage_v_cache_probe.py --keep 192 --rounds 7
    python scripts/stage_v_cache_probe.py --shape tiny --keep 128 --rounds 1   # a smoke run in seconds
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtprune
from vtprune.eval.profile import build_llava_shape, llava_inputs
from vtprune.methods.pitome import PiToMe
from vtprune.policy import Context

QUESTION = "What objects are visible in this image and why?"
SYSTEM = "A chat between a user and an AI assistant. "


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llava-1.5-1b", choices=["llava-1.5-1b", "tiny"])
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of each variant (after one warm-up)")
    ap.add_argument("--flush-mib", type=int, default=64, help="size of the buffer read to flush the caches")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, proc = build_llava_shape(args.shape)
    inputs = llava_inputs(proc, QUESTION, system=SYSTEM)
    policy = PiToMe(keep=args.keep)
    own = PiToMe.after_layer
    calls: list[tuple[int, torch.Tensor]] = []
    towers = []
    spent = [0.0]

    def timed(layer, x, ctx, record=False):
        if record:
            calls.append((layer, x.clone()))
            towers.append(ctx.vit)
        t = time.perf_counter()
        out = own(policy, layer, x, ctx)
        spent[0] += time.perf_counter() - t
        return out

    in_situ = []
    for i in range(args.rounds + 1):
        spent[0] = 0.0
        record = i == 0
        policy.after_layer = lambda layer, x, ctx, record=record: timed(layer, x, ctx, record)
        handle = vtprune.patch(model, policy)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        handle.remove()
        if i:
            in_situ.append(spent[0] * 1e3)
    del policy.after_layer
    vit = towers[0]

    big = torch.ones(args.flush_mib << 20, dtype=torch.uint8)
    tiny = torch.randn(1, vit.tokens, 16, dtype=calls[0][1].dtype)

    def replay(flush: bool, rewarm: bool) -> float:
        ctx, warm_ctx = Context(family="llava", vit=vit), Context(family="llava", vit=vit)
        total = 0.0
        for layer, x in calls:
            if flush:
                big.sum()
            if rewarm:  # the same steps on a (1, tokens, 16) input: code warm, large tensors cold
                own(policy, layer, tiny[:, : x.shape[1]], warm_ctx)
            t = time.perf_counter()
            own(policy, layer, x, ctx)
            total += time.perf_counter() - t
        return total * 1e3

    variants = {"replay": (False, False), "replay, caches flushed": (True, False),
                "replay, flushed, kernels re-run": (True, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.rounds + 1):
        for name, (flush, rewarm) in variants.items():
            ms = replay(flush, rewarm)
            if i:
                times[name].append(ms)
    times = {"in situ": in_situ, **times}
    base = statistics.median(times["replay"])
    print(f"pitome:keep={args.keep}: {len(calls)} after_layer calls, median of {args.rounds} rounds "
          f"(flush: read {args.flush_mib} MiB)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:34s} {med:7.1f} ms  x{med / base:4.2f} of replay   [{min(ts):.1f}, {max(ts):.1f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
