"""The GPU check's scripts (benchmarks/gpu_check) where `make gpu-check-dry` cannot reach: the case
lists of the real GPU run (other sizes than the dry run's) build without error and with unique ids
(--resume after a sticky CUDA error skips cases by id), the sanitizer filters name every launched
Triton kernel, and summary.py reads what the stages leave, torn lines included.

Each runs in a subprocess: the scripts import their helpers by plain names (common, records) and
decide the mode (GPU or dry) at import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

GPU_CHECK = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check")
REPO = os.path.join(os.path.dirname(__file__), "..")


def run_script(code: str, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_DRY", "BENCH_OUT")}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=GPU_CHECK, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_gpu_case_lists_build_with_unique_ids():
    out = run_script("""
        import json, collections
        import bandwidth, correct, sanitize_calls, warm_triton
        cases = correct.build_cases(["cuda", "triton"])
        bench = bandwidth.build_cases(["cuda", "triton"])
        groups = collections.Counter(c.group for c in cases)
        print(json.dumps({
            "device": str(correct.DEVICE),
            "cases": [c.id for c in cases],
            "bench": [c.id for c in bench],
            "groups": groups,
            "gated": [c.id for c in cases if c.probe],
            "warm": len(warm_triton.warm_calls()),
            "sanitize": [name for name, _ in sanitize_calls.calls("cuda")],
        }))
    """)
    lists = json.loads(out.strip().splitlines()[-1])
    assert lists["device"] == "cuda"
    for name in ("cases", "bench"):
        ids = lists[name]
        assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1][:5]
    # every group of the list is there, at the GPU sizes
    for group in ("gram", "cross_gram", "combine", "layouts", "project_simplex", "min_norm", "steps", "graphs",
                  "host_sync", "side_stream", "fl", "large"):
        assert lists["groups"].get(group, 0) > 0, group
    assert any("K=64/d=100003" in i for i in lists["cases"])
    assert any(i.startswith("large/cuda/gram/K=2/d=1200000000") for i in lists["cases"])
    assert all("float64" in i and "/triton/" in i for i in lists["gated"]) and lists["gated"]
    assert lists["warm"] > 500  # the Triton calls of all three later stages
    assert len(lists["sanitize"]) >= 10


def test_sanitizer_filters_name_every_launched_triton_kernel():
    out = run_script("import sanitize_calls; print(sanitize_calls.kernel_filters())", GPU_CHECK_DRY="1")
    triton_dir = os.path.join(REPO, "molkernels", "triton")
    launched = set()
    for name in os.listdir(triton_dir):
        if name.endswith(".py"):
            with open(os.path.join(triton_dir, name), encoding="utf-8") as file:
                launched |= set(re.findall(r"\b(_\w+_kernel)\[", file.read()))
    assert launched
    for kernel in launched:
        assert kernel in out, f"{kernel} is launched but not in the sanitizer's filters: {out}"
    assert "kns=_ZN2mk" in out  # the C++ kernels, all in namespace mk


def test_summary_reads_the_stage_files(tmp_path):
    records = [
        {"case": "gram/cuda/float32/K=8/d=17", "group": "gram", "backend": "cuda", "op": "gram", "dtype": "float32",
         "status": "pass", "err": 2e-6, "tol": 1e-5},
        {"case": "combine/triton/bfloat16/K=64/d=4099", "group": "combine", "backend": "triton", "op": "combine",
         "dtype": "bfloat16", "status": "fail", "err": 0.5, "tol": 0.01, "failed": ["reference: 3 elements off"]},
        {"case": "graph/cuda/moco_step/decay/K=3", "group": "graphs", "backend": "cuda", "op": "moco_step",
         "status": "fail", "failed": ["replay_matches_eager: replay 1 differs first"]},
        {"case": "large/cuda/gram/K=2/d=1200000000", "group": "large", "backend": "cuda", "status": "error",
         "error": "RuntimeError: CUDA error: an illegal memory access was encountered", "sticky_cuda_error": True},
        {"case": "_not_run", "group": "deadline", "status": "not_run", "count": 7, "first": "fl/cuda/adam"},
    ]
    with open(tmp_path / "correct.json", "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
        file.write('{"case": "torn')  # a kill mid-write
    (tmp_path / "sanitizer.txt").write_text(
        "## memcheck (limit 40 s): compute-sanitizer --tool memcheck\n========= ERROR SUMMARY: 2 errors\n"
        "## memcheck: ERRORS (rc 99, 31 s)\n## initcheck: TIMED OUT (rc 124, 30 s)\n", encoding="utf-8")
    (tmp_path / "bench.csv").write_text(
        "id,section,op,backend,dtype,shape,layout,blocks,bytes,median_us,host_us,graph_us,copy_us,fraction_of_copy,"
        "GBps,launches,kernel_us,note\n"
        "gram/cuda/float32/K=8/tensor,kernels,gram,cuda,float32,\"K=8,d=8000000\",tensor,1,256000000,900,10,880,"
        "80,0.0889,284,2,870,\n", encoding="utf-8")
    summary = lambda what: run_script(f"import summary, sys; sys.exit(summary.main(['', '{what}']))",  # noqa: E731
                                      BENCH_OUT=str(tmp_path))
    correct = summary("correct")
    assert "1 pass" in correct and "2 fail" in correct and "7 not run" in correct
    assert "FAIL combine/triton/bfloat16/K=64/d=4099: reference: 3 elements off" in correct
    assert "sticky CUDA error in large/cuda/gram" in correct
    assert "FAIL graph/cuda/moco_step/decay/K=3: replay_matches_eager: replay 1 differs first" in correct
    sanitizer = summary("sanitizer")
    assert "memcheck: ERRORS (rc 99, 31 s)" in sanitizer and "initcheck: TIMED OUT" in sanitizer
    assert "ERROR SUMMARY: 2 errors" in sanitizer and "limit 40 s" not in sanitizer
    assert "lowest fraction of copy bandwidth gram float32 K=8,d=8000000 tensor 0.089" in summary("bandwidth")
    digest = summary("digest")
    assert "| group | backend | error | fail | pass |" in digest
    assert "| combine | triton |  | 1 |  |" in digest
    assert "not run (stage deadline): 7 cases, from fl/cuda/adam" in digest
