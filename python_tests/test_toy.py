"""The toy experiments (molkernels.toy, molkernels.toy_problems): the CAGrad/MoCo toy's closed-form
gradients against autograd, the exact MGDA direction against molkernels.min_norm, and short runs of
`python -m molkernels toy` (JSON keys, finite values, determinism given the seed)."""

import json
import math

import pytest
import torch

import molkernels
from molkernels import toy, toy_problems as tp


def _points(n=4000, seed=0):
    """Points over both regions of the toy (x2 > 0: the log valleys; x2 < 0: the quadratic bowls),
    plus CAGrad's starts and points near the valleys' floor lines u1 = 0 and u2 = 0."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.5) * 24
    starts = torch.tensor(tp.STARTS, dtype=torch.float64)
    x2 = torch.linspace(0.3, 9, 20, dtype=torch.float64)
    near_u1 = torch.stack([2 * (torch.tanh(x2) - 3.5) + 1e-3, x2], dim=-1)  # u1 = -5e-4
    near_u2 = torch.stack([2 * (3.5 - torch.tanh(x2)) + 1e-3, x2], dim=-1)  # u2 = -5e-4
    return torch.cat([x, starts, near_u1, near_u2])


def _autograd_jacobian(x):
    x = x.clone().requires_grad_(True)
    F = tp.objectives(x)
    rows = [torch.autograd.grad(F[:, k].sum(), x, retain_graph=True)[0] for k in range(tp.K)]
    return torch.stack(rows, dim=1)


def test_closed_form_gradients_match_autograd():
    x = _points()
    expected = _autograd_jacobian(x)
    got = tp.gradients(x)
    assert got.shape == (x.shape[0], tp.K, 2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_objectives_match_the_published_formulas_at_known_points():
    # Values of CAGrad's Toy.batch_forward (its reference code), written out by hand.
    x = torch.tensor([[0.0, -8.0], [9.0, 9.0]], dtype=torch.float64)
    F = tp.objectives(x)
    c2 = math.tanh(4.0)
    torch.testing.assert_close(F[0], torch.tensor([c2 * (49 / 10 - 20), c2 * (49 / 10 - 20)], dtype=torch.float64))
    c1 = math.tanh(4.5)
    u1 = 0.5 * (-9 - 7) - math.tanh(-9)
    u2 = 0.5 * (-9 + 3) + math.tanh(-9) + 2
    expected = [c1 * (math.log(abs(u1)) + 6), c1 * (math.log(abs(u2)) + 6)]
    torch.testing.assert_close(F[1], torch.tensor(expected, dtype=torch.float64))


def test_exact_mgda_direction_matches_min_norm_on_the_true_gram():
    x = _points(1000, seed=1)
    G = tp.gradients(x)
    d_star, lam_star = tp.mgda_direction(G)
    gram = G @ G.transpose(-1, -2)
    lam = molkernels.min_norm(gram)  # the kernel, batched over the points
    assert lam.dtype == torch.float64
    d = (lam.unsqueeze(-1) * G).sum(-2)
    scale = gram.diagonal(dim1=-2, dim2=-1).amax(-1).sqrt().clamp(min=1e-12)
    assert ((d - d_star).norm(dim=-1) / scale).max() < 1e-7
    # The same minimum: λ*ᵀ G λ* equals the kernel's objective (λ itself is not unique when g1 = g2).
    obj = lambda w: torch.einsum("bi,bij,bj->b", w, gram, w)
    assert ((obj(lam_star) - obj(lam)).abs() / scale ** 2).max() < 1e-9
    assert torch.allclose(lam_star.sum(-1), torch.ones(len(x), dtype=torch.float64))
    assert (lam_star >= 0).all()


def test_mgda_step_on_the_toy_writes_the_exact_direction():
    x = torch.tensor(tp.STARTS[1], dtype=torch.float64)
    G = tp.gradients(x)
    d_star, lam_star = tp.mgda_direction(G)
    lam = molkernels.mgda_step([x], G)
    torch.testing.assert_close(x.grad, d_star, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lam.to(torch.float64), lam_star, rtol=1e-7, atol=1e-9)


def test_pareto_set_is_pareto_stationary():
    P = tp.pareto_set(21)
    d_star, _ = tp.mgda_direction(tp.gradients(P))
    assert d_star.norm(dim=-1).max() < 1e-3  # the grid step of x2 is 1e-3, the curvature small
    assert torch.allclose(P[10], torch.tensor([0.0, -8.3552], dtype=torch.float64), atol=2e-3)  # CAGrad's yy


def _short(**kw):
    return toy.ToySettings(steps=kw.pop("steps", 40), mc_draws=16, traj_every=5, curve_points=10, **kw)


def test_run_toy_is_deterministic_given_the_seed():
    a = toy.run_toy(("mgda", "moco", "modo"), seeds=2, seed=3, settings=_short(), progress=False)
    b = toy.run_toy(("mgda", "moco", "modo"), seeds=2, seed=3, settings=_short(), progress=False)
    c = toy.run_toy(("mgda", "moco", "modo"), seeds=2, seed=4, settings=_short(), progress=False)
    for m in ("mgda", "moco", "modo"):
        assert a["curves"][m] == b["curves"][m]
        assert a["methods"][m]["final_points"] == b["methods"][m]["final_points"]
        assert a["methods"][m]["final_points"] != c["methods"][m]["final_points"]


def test_methods_share_the_noise_stream():
    """SMG's runs do not depend on which other methods run beside it (common random numbers)."""
    a = toy.run_toy(("mgda", "moco"), seeds=2, seed=0, settings=_short(), progress=False)
    b = toy.run_toy(("mgda", "modo"), seeds=2, seed=0, settings=_short(), progress=False)
    assert a["methods"]["mgda"]["final_points"] == b["methods"]["mgda"]["final_points"]


def _finite(obj):
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


@pytest.mark.parametrize("experiment", ["bias", "modo"])
def test_cli_short_toy_run_writes_json_and_png(tmp_path, experiment, capsys):
    from molkernels.__main__ import main

    out = tmp_path / "toy"
    rc = main(["toy", "--experiment", experiment, "--steps", "30", "--seeds", "2", "--seed", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "toy.json").read_text())
    assert (out / "toy.png").stat().st_size > 10_000
    assert data["experiment"] == experiment
    result = data["toy"]
    methods = dict(bias=["mgda", "moco"], modo=["mgda", "modo"])[experiment]
    assert set(result["methods"]) == {"mgda_exact", *methods}
    for m in methods:
        final = result["methods"][m]["final"]
        for key in ("dir_err", "stationarity", "weight_bias"):
            assert set(final[key]) >= {"mean", "std", "per_seed", "per_start"}
            assert len(final[key]["per_seed"]) == 2
        assert len(result["curves"][m]["step"]) == len(result["curves"][m]["dir_err"])
    assert "expected_bias" in result["methods"]["mgda"]["final"]
    assert result["claims"] and all(set(c) == {"claim", "evidence", "holds"} for c in result["claims"])
    assert _finite(data)
    printed = capsys.readouterr().out
    assert ("HOLDS" in printed or "FAILS" in printed) and "stationarity" in printed


def test_cli_short_mtl_run_writes_the_table(tmp_path, capsys):
    from molkernels.__main__ import main

    missing = toy.mol_missing()
    if missing:
        pytest.skip(missing)
    out = tmp_path / "mtl"
    rc = main(["toy", "--experiment", "mtl", "--mtl-steps", "15", "--seeds", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "toy.json").read_text())
    table = data["mtl"]["table"]
    assert list(table) == list(toy.MTL_METHODS)
    for name, row in table.items():
        for key in ("test_mse", "test_bce", "test_accuracy", "ms_per_step", "delta_test_mse", "delta_test_bce"):
            assert len(row[key]["per_seed"]) == 2, (name, key)
        assert row["test_mse"]["mean"] > 0 and row["ms_per_step"]["mean"] > 0
    assert -1 <= data["mtl"]["conflict"]["mean_cosine"] <= 1
    assert _finite(data)
    printed = capsys.readouterr().out
    assert all(name in printed for name in toy.MTL_METHODS)


def test_mtl_run_is_deterministic_given_the_seed():
    if toy.mol_missing():
        pytest.skip(toy.mol_missing())
    settings = toy.MTLSettings(steps=12)
    for name in ("MoCo", "MoDo", "PCGrad"):
        a = toy.train_mtl(name, 5, settings)
        b = toy.train_mtl(name, 5, settings)
        assert {k: v for k, v in a.items() if k != "ms_per_step"} == {k: v for k, v in b.items() if k != "ms_per_step"}
