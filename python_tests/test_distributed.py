"""molkernels.distributed and the process_group paths of the steps and mol.backward, in gloo worlds
of 2 and 3 CPU processes (torch.multiprocessing, spawn).

One world is spawned per size and runs every case of distributed_cases.CASES (spawning costs
seconds, the cases milliseconds); each test below reports one case's outcome on every rank.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

import distributed_cases

WORLD_SIZES = (2, 3)
TIMEOUT_S = 240

_results = {}


def _unavailable_reason():
    if not dist.is_available():
        return "torch.distributed is not available in this torch build"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build"
    return None


def _run_world(world: int):
    """Spawn `world` ranks running every case; returns {case: [(status, detail) per rank]}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        names = list(distributed_cases.CASES)
        context = mp.start_processes(distributed_cases.main, args=(world, init_file, tmp, names), nprocs=world,
                                     join=False, start_method="spawn")
        crash = None
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {world}-rank world did not finish in {TIMEOUT_S} s")
        except Exception as error:  # noqa: BLE001 - reported below with what the ranks finished
            crash = error
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        reports = {}
        for rank in range(world):
            path = os.path.join(tmp, f"rank{rank}.pt")
            reports[rank] = torch.load(path, weights_only=False) if os.path.exists(path) else {}
        if crash is not None:
            done = {rank: len(r) for rank, r in reports.items()}
            raise RuntimeError(f"the {world}-rank world crashed ({crash!r}) after the ranks had finished "
                               f"{done} of {len(names)} cases") from crash
        return reports[0]


def world_outcomes(world: int):
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    if world not in _results:
        try:
            _results[world] = _run_world(world)
        except Exception as error:  # a crashed world fails every case, once each, with the cause
            _results[world] = error
    if isinstance(_results[world], Exception):
        raise _results[world]
    return _results[world]


@pytest.mark.parametrize("name", list(distributed_cases.CASES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_case(world, name):
    outcomes = world_outcomes(world)
    assert name in outcomes, f"case {name} did not report (an earlier case may have hung or crashed the world)"
    statuses = outcomes[name]
    print(f"{name} in a {world}-rank world: " + ", ".join(f"{s[2]:.2f} s" for s in statuses))
    failures = [f"rank {r}:\n{detail}" for r, (status, detail, _) in enumerate(statuses) if status == "fail"]
    assert not failures, "\n".join(failures)
    skips = {detail for status, detail, _ in statuses if status == "skip"}
    if skips:
        pytest.skip("; ".join(sorted(skips)))


def test_bench_distributed_counts_the_bytes():
    """`bench distributed` at a tiny size: the sharded Gram's message is K² float64 whatever D and
    the number of ranks; reducing the gradients moves K·D floats."""
    reason = _unavailable_reason()
    if reason:
        pytest.skip(reason)
    from molkernels import bench

    K, d = 3, 1000
    result = bench.bench_distributed(K, d, device=torch.device("cpu"), dtype=torch.float32, repeats=1, ranks=(1, 2))
    rows = {row.impl: row for row in result.rows}
    assert len(rows) == 2 * len(bench.DISTRIBUTED_PATHS)
    for world in (1, 2):
        suffix = f"[{world} rank{'s' if world > 1 else ''}]"
        sharded = next(r for name, r in rows.items() if name.startswith("sharded Gram") and name.endswith(suffix))
        stack = next(r for name, r in rows.items() if "one all_reduce" in name and name.endswith(suffix))
        assert f"1 collectives, messages {K * K * 8} B" in sharded.note, sharded.note
        assert "1 collectives, messages 12 kB" in stack.note, stack.note  # K·D·4 = 12000 bytes
        assert sharded.median_s > 0 and stack.median_s > 0
