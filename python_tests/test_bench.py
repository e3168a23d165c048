"""The bench CLI at tiny sizes: every benchmark runs, times each implementation, checks its
accuracy columns, and writes CSV and markdown (speed itself is the bench's job, never a test's)."""

from __future__ import annotations

import csv
import math
import signal

import pytest

from molkernels import bench
from molkernels.__main__ import main

TINY = {"gram": (["3"], ["1000"]), "combine": (["3"], ["1000"]), "min_norm": (["2", "5"], ["1"]),
        "mgda": (["3"], ["1000"]), "moco": (["3"], ["2000"]), "backward": (["2"], ["16"]),
        "fl_round": (["20"], ["10"]), "fl_adam": (["20"], ["10"])}


@pytest.mark.parametrize("op", sorted(TINY))
def test_every_benchmark_runs_at_tiny_sizes(op, tmp_path, capsys):
    Ks, ds = TINY[op]
    csv_path, md_path = tmp_path / "out.csv", tmp_path / "out.md"
    args = ["bench", op, "--K", *Ks, "--d", *ds, "--repeats", "2", "--blocks", "4", "--threads", "1",
            "--csv", str(csv_path), "--markdown", str(md_path)]
    assert main(args) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["op"] == op for r in rows)
    assert all(math.isfinite(float(r["median_s"])) and float(r["median_s"]) >= 0 for r in rows)
    assert len({r["impl"] for r in rows}) >= 2          # molkernels and at least one baseline
    assert md_path.read_text().count("|") > 10
    assert f"({op}: " in capsys.readouterr().out


def test_every_op_has_defaults_and_unknown_ops_fail():
    assert set(bench.OPS) == set(bench.DEFAULT_K) == set(bench.DEFAULT_D)
    assert set(TINY) | {"distributed"} == set(bench.OPS)   # distributed: python_tests/test_distributed.py
    with pytest.raises(ValueError, match="op: unknown"):
        bench.run_op("nope", Ks=[2], ds=[10], device=None, dtype=None, repeats=1, blocks=1)
    with pytest.raises(SystemExit):
        main(["bench", "nope"])


def test_busy_cores_spin_for_the_run_and_are_gone_after(tmp_path, capsys, monkeypatch):
    started = []
    real_popen = bench.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    md_path = tmp_path / "out.md"
    args = ["bench", "gram", "--K", "2", "--d", "100", "--repeats", "1", "--blocks", "2", "--threads", "1",
            "--busy-cores", "1", "--csv", str(tmp_path / "out.csv"), "--markdown", str(md_path)]
    assert main(args) == 0
    spinners = [p for p in started if "while True: pass" in p.args]
    # still spinning when the run ended, and killed then (a return code of -SIGKILL)
    assert len(spinners) == 1 and spinners[0].poll() == -signal.SIGKILL
    assert "busy cores: 1" in md_path.read_text() and "--busy-cores 1" in md_path.read_text()


def test_busy_cores_must_leave_a_core(capsys):
    cores = bench.os.cpu_count() or 1
    with pytest.raises(SystemExit):
        main(["bench", "gram", "--busy-cores", str(cores)])
    assert f"--busy-cores: {cores} would leave none" in capsys.readouterr().err
