"""The build stage's Triton warm-up: while nvcc builds the extension (Triton needs none of it),
a few of these processes run every Triton call that the later stages make, once, without checks,
so that those stages find the kernels compiled in TRITON_CACHE_DIR (each odd shape, alignment,
dtype and BLOCK size is its own variant, 0.7-5 s to compile; and a compile during CUDA-graph
capture is unsafe).

    warm_triton.py --shard I --shards N   every N-th call of correct.py, sanitize_calls.py and
                                          bandwidth.py, each in the order its stage runs them
    warm_triton.py --probe NAME           the calls gated on that probe (the float64 Triton MoCo at
                                          K ≥ 17, GPU-NOTES 1.1.3: over a minute to compile); writes
                                          "ok <seconds>" or the error to $GPU_CHECK_STATE_DIR/NAME

Exit code 4 after a sticky CUDA error; a call that fails is printed and skipped (the later stages
record it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import common

import bandwidth  # noqa: E402
import correct  # noqa: E402
import sanitize_calls  # noqa: E402


def warm_calls():
    """(name, thunk) of every Triton call of the later stages, in their order."""
    calls = []
    for case in correct.build_cases(["triton"]):
        if case.warm and case.probe is None:
            calls.append((case.id, correct_thunk(case)))
    # the sanitizer's few calls before the bandwidth stage's many: its tools have tens of seconds each
    calls += [(f"sanitize/{name}", thunk) for name, thunk in sanitize_calls.calls("triton")]
    for case in bandwidth.build_cases(["triton"]):
        calls.append((case.id, lambda case=case: case.call(case.prepare())))
    return calls


def correct_thunk(case):
    def run():
        common.seed(case.id)
        case.call(case.prepare())

    return run


def run(calls, label: str) -> int:
    started = time.perf_counter()
    failures = 0
    for name, thunk in calls:
        begun = time.perf_counter()
        try:
            thunk()
            common.synchronize()
        except Exception as error:  # the later stages record this call's failure; warm the rest
            failures += 1
            print(f"{label}: {name}: {common.first_line(error)}", flush=True)
            if common.context_broken():
                print(f"{label}: sticky CUDA error: stopping", flush=True)
                return 4
        seconds = time.perf_counter() - begun
        if seconds > 2.0:
            print(f"{label}: {name}: {seconds:.1f} s", flush=True)
    print(f"{label}: {len(calls)} calls in {time.perf_counter() - started:.0f} s, {failures} failed", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--probe", default=None)
    args = parser.parse_args(argv)
    if common.unavailable_reason("triton") is not None:
        print(f"warm-up: nothing to do, triton unavailable: {common.unavailable_reason('triton')}", flush=True)
        return 0
    if args.probe is None:
        calls = warm_calls()[args.shard::args.shards]
        return run(calls, f"warm-up {args.shard + 1}/{args.shards}")

    os.makedirs(common.STATE_DIR, exist_ok=True)
    status_path = os.path.join(common.STATE_DIR, args.probe)
    with open(status_path, "w", encoding="utf-8") as file:
        file.write("running")
    gated = [c for c in correct.build_cases(["triton"]) if c.probe == args.probe]
    started = time.perf_counter()
    label = f"probe {args.probe}"
    for case in gated:
        begun = time.perf_counter()
        try:
            correct_thunk(case)()
            common.synchronize()
        except Exception as error:  # recorded in the status file; correct.py then skips these cases
            with open(status_path, "w", encoding="utf-8") as file:
                file.write(f"failed in {case.id}: {common.first_line(error)}")
            print(f"{label}: {case.id}: {common.first_line(error)}", flush=True)
            return 0
        print(f"{label}: {case.id}: {time.perf_counter() - begun:.1f} s", flush=True)
    with open(status_path, "w", encoding="utf-8") as file:
        file.write(f"ok {time.perf_counter() - started:.1f}")
    print(f"{label}: {len(gated)} calls in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
