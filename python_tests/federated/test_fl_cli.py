"""`python -m molkernels fl` end to end at tiny sizes: JSON (radius + per-round history) and PNG,
a sweep, and bad input."""

import json
import os

import pytest

from molkernels.__main__ import main

TINY = ["--clients", "8", "--dim", "4", "--rounds", "8", "--local-steps", "2", "--seeds", "2", "--no-progress"]


def test_single_run_writes_json_and_png(tmp_path, capsys):
    out, png = tmp_path / "fl.json", tmp_path / "fl.png"
    assert main(["fl", "--algorithm", "local_sgd", "--problem", "quadratic", "--kappa", "5", "--sigma", "0.5",
                 "--join-rate", "0.2", "--leave-rate", "0.2", "--json", str(out), "--plot", str(png),
                 "--out", str(tmp_path)] + TINY) == 0
    data = json.loads(out.read_text())
    assert isinstance(data["radius"], float) and data["radius"] > 0 and data["radius_max"] >= data["radius"]
    assert data["config"]["algorithm"] == "local_sgd" and data["config"]["kappa"] == 5.0
    assert len(data["history"]) == 2 and len(data["history"][0]["distance"]) == 8
    for key in ("distance", "norm", "active", "joined", "left"):
        assert key in data["history"][0]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "radius" in capsys.readouterr().out


def test_a_diverging_setting_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    # lr = 1e6 on a quadratic with curvature up to 1 overflows local SGD within a few rounds; the
    # simulator raises FloatingPointError there, and the sweep must record it, not stop.
    assert main(["fl", "--algorithm", "local_sgd", "--sweep", "lr=0.1,1e6", "--out", str(tmp_path)] + TINY) == 0
    data = json.loads((tmp_path / "fl_sweep.json").read_text())
    stable, diverged = data["sweep"]["results"]["local_sgd"]
    assert stable["bounded"] and stable["diverged_rounds"] == [None, None] and 0 < stable["radius"] < float("inf")
    assert not diverged["bounded"] and diverged["radius"] == float("inf")
    assert all(isinstance(t, int) and 0 <= t < 8 for t in diverged["diverged_rounds"])
    assert len(diverged["mean_distance"]) == 8
    assert "DIVERGED at round" in capsys.readouterr().out


def test_logreg_run(tmp_path):
    assert main(["fl", "--problem", "logreg", "--kappa", "20", "--out", str(tmp_path)] + TINY) == 0
    data = json.loads((tmp_path / "fl.json").read_text())
    assert data["radius"] > 0 and os.path.exists(tmp_path / "fl.png")


def test_sweep_runs_both_algorithms(tmp_path, capsys):
    assert main(["fl", "--sweep", "kappa=1,10", "--out", str(tmp_path)] + TINY) == 0
    data = json.loads((tmp_path / "fl_sweep.json").read_text())
    assert data["sweep"]["parameter"] == "kappa" and data["sweep"]["values"] == [1.0, 10.0]
    assert set(data["radius"]) == {"local_sgd", "local_adam"}
    assert all(len(v) == 2 and all(r > 0 for r in v) for v in data["radius"].values())
    for claims in data["sweep"]["claims"].values():
        assert {"increasing", "loglog_slope", "bounded"} <= set(claims)
    assert len(data["history"]["local_adam"][0]["mean_distance"]) == 8
    assert (tmp_path / "fl_sweep.png").stat().st_size > 10_000
    assert "radius against kappa" in capsys.readouterr().out


@pytest.mark.parametrize("args, name", [
    (["--algorithm", "fedavgm"], "fedavgm"), (["--problem", "mnist"], "mnist"),
    (["--join-rate", "1.5"], "join_rate"), (["--leave-rate", "-0.1"], "leave_rate"),
    (["--clients", "0"], "clients"), (["--sweep", "alpha=1,2"], "alpha"), (["--sweep", "kappa"], "sweep"),
    (["--sweep", "sigma=-1,1"], "sigma"), (["--seeds", "0"], "seeds"), (["--rounds", "1"], "rounds"),
])
def test_bad_input_names_the_argument(tmp_path, args, name):
    with pytest.raises(ValueError, match=name):
        main(["fl", "--out", str(tmp_path)] + TINY + args)
