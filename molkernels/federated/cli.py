"""`python -m molkernels fl`: the stability radius of open federated learning, measured.

    python -m molkernels fl --algorithm local_adam --problem quadratic --kappa 10 --sigma 1 \\
        --clients 100 --join-rate 0.1 --leave-rate 0.1 --local-steps 5 --rounds 200 --seeds 3 \\
        --json fl.json --plot fl.png
    python -m molkernels fl --sweep kappa=1,10,100,1000      # both algorithms, radius against κ
    python -m molkernels fl --sweep sigma=0,0.25,1,4,16

When clients join and leave there is no fixed model to converge to: the population, and with it the
optimum x*_t of Σ_{c active} w_c f_c, changes every round. What can be guaranteed is stability: the
server model stays within a bounded radius of the current optimum. The run measures, per round,
‖x_t − x*_t‖ (simulator.py), and

    radius      = the mean of ‖x_t − x*_t‖ over the second half of the rounds, averaged over seeds
    radius_max  = the max of ‖x_t − x*_t‖ over the second half, averaged over seeds
    drift       = mean over the last quarter / mean over the second quarter (≈ 1: no growth)

A setting is "bounded" when every distance is finite and drift < 1.5 in every seed. A sweep runs
both algorithms (or the one --algorithm names) at every value, on the same seeds, and says whether
the radius grows with the swept value (strictly increasing along the values, and the log-log
slope); the JSON and the plot keep the verdicts, whichever way they come out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Sequence

from .. import _cli

SWEEPABLE = {"kappa": float, "sigma": float, "join_rate": float, "leave_rate": float, "local_steps": int,
             "lr": float, "server_lr": float, "clients": int}
DEFAULT_SEEDS = 3
DRIFT_LIMIT = 1.5
LABELS = {"local_sgd": "local SGD", "local_adam": "local Adam"}
COLORS = {"local_sgd": "tab:blue", "local_adam": "tab:red"}


def parse_sweep(text: str):
    """An argument type: 'kappa=1,10,100' -> ('kappa', [1.0, 10.0, 100.0]), the values sorted and
    distinct (FLConfig.validate checks their range)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=V1,V2,..., got {text!r}")
    name, values = text.split("=", 1)
    name = name.strip().replace("-", "_")
    if name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(f"cannot sweep {name!r}; expected one of {', '.join(SWEEPABLE)}")
    cast = SWEEPABLE[name]
    try:
        parsed = [cast(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} values must be {cast.__name__}s, got {values!r}") from None
    if not parsed:
        raise argparse.ArgumentTypeError(f"no values for {name}")
    return name, sorted(set(parsed))


def second_half(values: Sequence[float]) -> List[float]:
    return [v for v in values[len(values) // 2:] if v == v]  # drop NaN (rounds without clients)


def summarise_run(history: List[dict]) -> dict:
    """One seed's radius (mean and max of the distance over the second half) and drift."""
    import numpy as np

    d = np.array([r["distance"] for r in history], dtype=float)
    T = len(d)
    tail = np.array(second_half(list(d)))
    q2, q4 = d[T // 4:T // 2], d[3 * T // 4:]
    q2m, q4m = np.nanmean(q2) if np.isfinite(q2).any() else np.nan, np.nanmean(q4) if np.isfinite(q4).any() else np.nan
    finite = bool(np.isfinite(d[~np.isnan(d)]).all()) and tail.size > 0
    drift = float(q4m / q2m) if q2m > 0 else float("nan")
    return {"radius": float(tail.mean()) if tail.size else float("nan"),
            "radius_max": float(tail.max()) if tail.size else float("nan"),
            "drift": drift, "bounded": bool(finite and drift < DRIFT_LIMIT),
            "mean_active": float(np.mean([r["active"] for r in history])) if history else float("nan"),
            "empty_rounds": int(sum(r["active"] == 0 for r in history))}


def mean_over_seeds(curves: Sequence[Sequence[float]]):
    """The per-round mean of equally long curves over the seeds, skipping NaN (a round where every
    seed is NaN, e.g. after all of them diverged, is NaN without a warning)."""
    import numpy as np

    d = np.array(curves, dtype=float)
    present = ~np.isnan(d)
    counts = present.sum(axis=0)
    totals = np.where(present, d, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan)


def run_setting(config, seeds: Sequence[int], progress=None) -> dict:
    """`config` (an FLConfig) on every seed: per-seed histories and summaries, and the averages."""
    import numpy as np
    import torch

    from .simulator import METRICS, OpenFLSimulator

    runs = []
    threads = torch.get_num_threads()
    if config.device == "cpu":
        torch.set_num_threads(1)  # [C, D] of a few thousand floats: threads only add overhead
    try:
        for seed in seeds:
            sim = OpenFLSimulator(config, seed=seed)
            started = time.perf_counter()
            # A diverged seed ends at its diverging round (the simulator's FloatingPointError); the
            # sweep goes on and reports the setting as diverged rather than losing every other one.
            diverged_round = None
            try:
                sim.run(callback=(lambda _: progress.update(1)) if progress is not None else None)
            except FloatingPointError:
                diverged_round = sim.history[-1]["round"]
            seconds = time.perf_counter() - started
            history = sim.history
            summary = summarise_run(history)
            if diverged_round is not None:
                summary.update(bounded=False, radius=float("inf"), radius_max=float("inf"))
            # A diverged run's metrics are NaN after its last round, so that every seed's curve has
            # config.rounds points.
            missing = [float("nan")] * (config.rounds - len(history))
            runs.append(dict(summary, seed=seed, seconds=seconds, diverged_round=diverged_round,
                             history={m: [r[m] for r in history] + missing for m in METRICS}))
    finally:
        torch.set_num_threads(threads)
    per_seed = [r["radius"] for r in runs]
    with np.errstate(invalid="ignore"):  # a diverged seed's radius is inf: the std is then NaN
        radius_std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    return {
        "radius": float(np.mean(per_seed)),
        "radius_std": radius_std,
        "radius_max": float(np.mean([r["radius_max"] for r in runs])),
        "radius_per_seed": per_seed,
        "bounded": all(r["bounded"] for r in runs),
        "diverged_rounds": [r["diverged_round"] for r in runs],
        "drift": [r["drift"] for r in runs],
        "mean_active": float(np.mean([r["mean_active"] for r in runs])),
        "empty_rounds": sum(r["empty_rounds"] for r in runs),
        "ms_per_round": 1e3 * sum(r["seconds"] for r in runs) / max(1, sum(len(r["history"]["distance"]) for r in runs)),
        "runs": runs,
    }


def _progress_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)


def run_single(config, seeds: Sequence[int], progress: bool = True) -> dict:
    bar = _progress_bar(config.rounds * len(seeds), f"fl {config.algorithm}") if progress else None
    try:
        result = run_setting(config, seeds, bar)
    finally:
        if bar is not None:
            bar.close()
    return result


def growth(values: Sequence[float], radii: Sequence[float]) -> dict:
    """Whether the radius grows along the values: strictly increasing, and the least-squares slope of
    log radius against log value (over the positive values)."""
    import numpy as np

    increasing = all(b > a for a, b in zip(radii, radii[1:]))
    v, r = np.array(values, dtype=float), np.array(radii, dtype=float)
    keep = (v > 0) & (r > 0) & np.isfinite(r)
    slope = float(np.polyfit(np.log(v[keep]), np.log(r[keep]), 1)[0]) if keep.sum() >= 2 else float("nan")
    out = {"increasing": bool(increasing), "loglog_slope": slope,
           "ratio_last_first": float(radii[-1] / radii[0]) if radii[0] > 0 else float("nan")}
    if len(v) >= 3:  # radius² = a + b·value² (for σ: the noise floor grows linearly in σ²), and its R²
        b_, a_ = np.polyfit(v ** 2, r ** 2, 1)
        fitted = a_ + b_ * v ** 2
        ss = float(((r ** 2 - (r ** 2).mean()) ** 2).sum())
        out["squared_fit"] = {"intercept": float(a_), "slope": float(b_),
                              "r2": float(1 - ((r ** 2 - fitted) ** 2).sum() / ss) if ss > 0 else float("nan")}
    return out


def run_sweep(config, parameter: str, values: Sequence, algorithms: Sequence[str], seeds: Sequence[int],
              progress: bool = True) -> dict:
    jobs = [(a, v) for a in algorithms for v in values]
    bar = _progress_bar(config.rounds * len(seeds) * len(jobs), f"fl sweep {parameter}") if progress else None
    results: Dict[str, List[dict]] = {a: [] for a in algorithms}
    try:
        for algorithm, value in jobs:
            setting = dataclasses.replace(config, algorithm=algorithm, **{parameter: value})
            if bar is not None:
                bar.set_postfix_str(f"{algorithm} {parameter}={value:g}")
            results[algorithm].append(dict(run_setting(setting, seeds, bar), value=value))
    finally:
        if bar is not None:
            bar.close()
    claims = {}
    for algorithm, rs in results.items():
        claims[algorithm] = dict(growth(values, [r["radius"] for r in rs]), bounded=all(r["bounded"] for r in rs))
    return {"parameter": parameter, "values": list(values), "results": results, "claims": claims}


# ----------------------------------------------------------------------------------------------
# Output.


def _strip_runs(result: dict, keep_history: bool) -> dict:
    """A setting's result for the JSON: per-seed histories kept (single runs) or replaced by the
    mean distance per round over seeds (sweeps)."""
    import numpy as np

    out = {k: v for k, v in result.items() if k != "runs"}
    if keep_history:
        out["history"] = [dict(seed=r["seed"], **r["history"]) for r in result["runs"]]
    else:
        out["mean_distance"] = [float(v) for v in mean_over_seeds([r["history"]["distance"] for r in result["runs"]])]
    out["seeds"] = [r["seed"] for r in result["runs"]]
    return out


def describe(config) -> str:
    return (f"{config.problem}, {config.clients} client slots, D={config.dim if config.problem == 'quadratic' else 'data'}, "
            f"κ={config.kappa:g}, σ={config.sigma:g}, {config.churn} churn join {config.join_rate:g} / leave "
            f"{config.leave_rate:g}, E={config.local_steps}, {config.rounds} rounds")


def print_single(config, result: dict) -> None:
    print(f"{LABELS[config.algorithm]} (lr {config.learning_rate:g}) on {describe(config)}, "
          f"seeds {[r['seed'] for r in result['runs']]}:")
    print(f"  radius (mean ‖x_t − x*_t‖ over the second half) = {result['radius']:.4g} ± {result['radius_std']:.2g} "
          f"(std over seeds); max {result['radius_max']:.4g}")
    print(f"  drift (last-quarter / second-quarter mean) {', '.join(f'{d:.2f}' for d in result['drift'])}: "
          f"{'bounded' if result['bounded'] else 'NOT bounded'} (limit {DRIFT_LIMIT})")
    for run in result["runs"]:
        if run["diverged_round"] is not None:
            print(f"  seed {run['seed']} DIVERGED at round {run['diverged_round']} (the server model became non-finite)")
    first = result["runs"][0]["history"]
    joins = sum(first["joined"]) / max(1, len(first["joined"]))
    leaves = sum(first["left"]) / max(1, len(first["left"]))
    print(f"  active clients {result['mean_active']:.1f} on average; {joins:.1f} joins and {leaves:.1f} departures "
          f"per round (seed {result['runs'][0]['seed']}); {result['empty_rounds']} rounds without clients; "
          f"{result['ms_per_round']:.2f} ms per round")


def _unbounded_mark(result: dict) -> str:
    diverged = sorted({t for t in result["diverged_rounds"] if t is not None})
    if diverged:
        return " DIVERGED at round " + ", ".join(str(t) for t in diverged)
    return "" if result["bounded"] else " UNBOUNDED"


def print_sweep(config, sweep: dict) -> None:
    p = sweep["parameter"]
    print(f"radius against {p} on {describe(config)} (mean ± std over seeds; max in brackets):")
    header = [p] + [LABELS[a] for a in sweep["results"]]
    rows = []
    for i, value in enumerate(sweep["values"]):
        row = [f"{value:g}"]
        for a, rs in sweep["results"].items():
            r = rs[i]
            row.append(f"{r['radius']:.4g} ± {r['radius_std']:.2g} [{r['radius_max']:.3g}]" + _unbounded_mark(r))
        rows.append(row)
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths]] + rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    for a, c in sweep["claims"].items():
        fit = ""
        if p == "sigma" and "squared_fit" in c:
            f = c["squared_fit"]
            fit = f"; radius² ≈ {f['intercept']:.3g} + {f['slope']:.3g}·σ² (R² {f['r2']:.3f})"
        print(f"  {LABELS[a]}: radius {'grows' if c['increasing'] else 'does NOT grow monotonically'} with {p} "
              f"(last/first {c['ratio_last_first']:.2f}×, log-log slope {c['loglog_slope']:.2f}{fit}); "
              f"{'bounded in every run' if c['bounded'] else 'NOT bounded in some run'}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_single(config, result: dict, path: str) -> None:
    import numpy as np

    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    color = COLORS[config.algorithm]
    T = len(result["runs"][0]["history"]["distance"])
    rounds = np.arange(T)
    for r in result["runs"]:
        ax.plot(rounds, r["history"]["distance"], color=color, alpha=0.35, lw=0.8)
    mean = np.nanmean(np.array([r["history"]["distance"] for r in result["runs"]], dtype=float), axis=0)
    ax.plot(rounds, mean, color=color, lw=1.6, label=f"{LABELS[config.algorithm]}, mean over seeds")
    ax.hlines(result["radius"], T // 2, T - 1, colors="black", linestyles="--",
              label=f"radius {result['radius']:.3g} (second half)")
    ax.hlines(result["radius_max"], T // 2, T - 1, colors="0.5", linestyles=":", label=f"max {result['radius_max']:.3g}")
    ax.set_yscale("log")
    ax.set_xlabel("round t")
    ax.set_ylabel("‖x_t − x*_t‖")
    ax.set_title(f"distance to the current population's optimum\n{describe(config)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    h = result["runs"][0]["history"]
    bx.plot(rounds, h["active"], color="black", lw=1, label="active clients")
    bx.bar(rounds, h["joined"], color="tab:green", alpha=0.6, label="joined")
    bx.bar(rounds, [-v for v in h["left"]], color="tab:orange", alpha=0.6, label="left (negative)")
    bx.set_xlabel("round t")
    bx.set_title(f"population (seed {result['runs'][0]['seed']})", fontsize=9)
    bx.legend(fontsize=8)
    bx.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(config, sweep: dict, path: str) -> None:
    import numpy as np

    plt = _pyplot()
    p, values = sweep["parameter"], np.array(sweep["values"], dtype=float)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    log_x = bool((values > 0).all()) and len(values) > 1 and values.max() / values.min() >= 10
    for a, rs in sweep["results"].items():
        r = np.array([x["radius"] for x in rs])
        ax.errorbar(values, r, yerr=[x["radius_std"] for x in rs], color=COLORS[a], marker="o", capsize=3,
                    label=f"{LABELS[a]}: mean over the second half")
        ax.plot(values, [x["radius_max"] for x in rs], color=COLORS[a], ls=":", marker=".", label=f"{LABELS[a]}: max")
        for i, x in enumerate(rs):
            curve = x.get("mean_distance") or mean_over_seeds([s["history"]["distance"] for s in x["runs"]])
            bx.plot(curve, color=COLORS[a], alpha=0.35 + 0.65 * (i + 1) / len(rs), lw=1,
                    label=f"{LABELS[a]}, {p}={x['value']:g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(p)
    ax.set_ylabel("stability radius: ‖x_t − x*_t‖ over the second half")
    ax.set_title(f"radius against {p}\n{describe(config)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    bx.set_yscale("log")
    bx.set_xlabel("round t")
    bx.set_ylabel("‖x_t − x*_t‖, mean over seeds")
    bx.set_title("distance per round (darker: larger value)", fontsize=9)
    bx.legend(fontsize=6, ncol=2)
    bx.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_radius_panels(config, sweeps: Sequence[dict], path: str) -> None:
    """One panel per sweep: the radius against the swept value, both algorithms."""
    import numpy as np

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.2), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        values = np.array(sweep["values"], dtype=float)
        for a, rs in sweep["results"].items():
            ax.errorbar(values, [x["radius"] for x in rs], yerr=[x["radius_std"] for x in rs], color=COLORS[a],
                        marker="o", capsize=3, label=LABELS[a])
        if (values > 0).all():
            ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(sweep["parameter"])
        ax.set_ylabel("radius: mean ‖x_t − x*_t‖, second half")
        ax.set_title(f"stability radius against {sweep['parameter']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(describe(config), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo(out: str, *, seeds: int = 2, rounds: int = 100) -> dict:
    """The demo's FL section (a few seconds): radius against κ and against σ, both algorithms, on
    the default quadratic under Bernoulli churn; the plot in OUT/fl_radius.png."""
    from .simulator import ALGORITHMS, FLConfig

    config = FLConfig(rounds=rounds)
    seed_list = list(range(seeds))
    sweeps = [run_sweep(config, "kappa", [1.0, 10.0, 100.0], ALGORITHMS, seed_list),
              run_sweep(config, "sigma", [0.25, 1.0, 4.0], ALGORITHMS, seed_list)]
    for sweep in sweeps:
        print_sweep(config, sweep)
    path = os.path.join(out, "fl_radius.png")
    plot_radius_panels(config, sweeps, path)
    print(f"wrote {path} (the full runs: python -m molkernels fl --sweep kappa=1,10,100,1000)")
    return {"png": path, "rounds": rounds, "seeds": seed_list,
            "radius": {s["parameter"]: {"values": s["values"],
                                        **{a: [r["radius"] for r in rs] for a, rs in s["results"].items()}}
                       for s in sweeps},
            "claims": {s["parameter"]: s["claims"] for s in sweeps}}


# ----------------------------------------------------------------------------------------------
# The command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options; those that are FLConfig fields are checked by FLConfig.validate (in `check`)."""
    from .problems import DATASETS
    from .simulator import FLConfig

    d = FLConfig()
    parser.add_argument("--algorithm", default=None,
                        help="local_sgd or local_adam (default local_adam; a sweep runs both unless this is given)")
    parser.add_argument("--problem", default=d.problem, help="quadratic (default) or logreg")
    parser.add_argument("--kappa", type=float, default=d.kappa, help=f"condition number κ (default {d.kappa:g})")
    parser.add_argument("--sigma", type=float, default=d.sigma,
                        help=f"gradient noise σ: E‖ξ‖² = σ² (default {d.sigma:g})")
    parser.add_argument("--clients", type=int, default=d.clients, help=f"client slots C (default {d.clients})")
    parser.add_argument("--dim", type=int, default=d.dim, help=f"dimension of the quadratic (default {d.dim})")
    parser.add_argument("--churn", default=d.churn, help="bernoulli (default) or replacement")
    parser.add_argument("--join-rate", type=float, default=d.join_rate,
                        help=f"probability per round that an empty slot gets a new client (default {d.join_rate:g})")
    parser.add_argument("--leave-rate", type=float, default=d.leave_rate,
                        help=f"probability per round that an active client leaves (default {d.leave_rate:g})")
    parser.add_argument("--local-steps", type=int, default=d.local_steps, help=f"E (default {d.local_steps})")
    parser.add_argument("--rounds", type=_cli.int_range(2), default=d.rounds,
                        help=f"rounds per run, at least 2: the radius is taken over the second half "
                             f"(default {d.rounds})")
    parser.add_argument("--lr", type=float, default=None, help="local learning rate (default 0.1 SGD, 0.01 Adam)")
    parser.add_argument("--server-lr", type=float, default=d.server_lr, help="server learning rate (default 1)")
    parser.add_argument("--state-on-join", default=d.state_on_join,
                        help="reset (default): a new client starts with fresh optimiser state; inherit: keeps the slot's")
    parser.add_argument("--weighting", default=d.weighting, help="size (default: w_c = local data size) or uniform")
    parser.add_argument("--init", default=d.init, help="optimum (default: x_0 = x*_0) or zero")
    parser.add_argument("--dataset", default=None, choices=DATASETS, help="logreg: breast_cancer (default) or digits")
    parser.add_argument("--seeds", type=_cli.positive_int, default=DEFAULT_SEEDS,
                        help=f"seeds per setting (default {DEFAULT_SEEDS})")
    parser.add_argument("--seed", type=_cli.seed, default=0, help="first seed (default 0)")
    parser.add_argument("--sweep", type=parse_sweep, default=None,
                        help=f"NAME=V1,V2,...: run every value for both algorithms; NAME in {', '.join(SWEEPABLE)}")
    parser.add_argument("--backend", default=d.backend, help="kernel backend (default auto)")
    parser.add_argument("--device", type=_cli.device, default=d.device, help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=d.dtype, help="float32 (default) or float64")
    parser.add_argument("--out", type=_cli.output_folder, default="molkernels-fl",
                        help="output folder (default ./molkernels-fl/)")
    parser.add_argument("--json", type=_cli.output_file, default=None,
                        help="JSON output (default OUT/fl.json or OUT/fl_sweep.json)")
    parser.add_argument("--plot", type=_cli.output_file, default=None,
                        help="PNG output (default OUT/fl.png or OUT/fl_sweep.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The FLConfig of the options, validated (ValueError naming the first bad field)."""
    from .simulator import FLConfig

    options = {}
    if args.dataset is not None:
        if args.problem != "logreg":
            raise ValueError("--dataset: only for --problem logreg")
        options["dataset"] = args.dataset
    config = FLConfig(algorithm=args.algorithm or "local_adam", problem=args.problem, clients=args.clients,
                      dim=args.dim, kappa=args.kappa, sigma=args.sigma, churn=args.churn, join_rate=args.join_rate,
                      leave_rate=args.leave_rate, local_steps=args.local_steps, rounds=args.rounds, lr=args.lr,
                      server_lr=args.server_lr, state_on_join=args.state_on_join, weighting=args.weighting,
                      init=args.init, backend=args.backend, device=args.device, dtype=args.dtype,
                      problem_options=options)
    return config.validate()


def sweep_algorithms(args: argparse.Namespace) -> List[str]:
    """The algorithms a sweep runs: the one --algorithm names, else all."""
    from .simulator import ALGORITHMS

    return [args.algorithm] if args.algorithm else list(ALGORITHMS)


def check(args: argparse.Namespace) -> None:
    """Every setting the run will simulate (each sweep value of each algorithm) valid, and the
    backend able to run on the device, before anything runs."""
    config = config_from_args(args)
    if args.sweep:
        parameter, values = args.sweep
        for value in values:
            for algorithm in sweep_algorithms(args):
                try:
                    dataclasses.replace(config, algorithm=algorithm, **{parameter: value}).validate()
                except ValueError as error:
                    raise ValueError(f"--sweep: {error}") from None
    _cli.check_backend(args.backend, args.device)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    seeds = [args.seed + i for i in range(args.seeds)]
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    out: Dict[str, object] = {"command": "fl", "config": config.to_dict(), "seeds": seeds}
    if args.sweep:
        parameter, values = args.sweep
        json_path = args.json or os.path.join(args.out, "fl_sweep.json")
        plot_path = args.plot or os.path.join(args.out, "fl_sweep.png")
        sweep = run_sweep(config, parameter, values, sweep_algorithms(args), seeds, progress=not args.no_progress)
        print_sweep(config, sweep)
        plot_sweep(config, sweep, plot_path)
        out["sweep"] = {"parameter": parameter, "values": values, "claims": sweep["claims"],
                        "results": {a: [_strip_runs(r, keep_history=False) for r in rs]
                                    for a, rs in sweep["results"].items()}}
        out["radius"] = {a: [r["radius"] for r in rs] for a, rs in sweep["results"].items()}
        out["radius_max"] = {a: [r["radius_max"] for r in rs] for a, rs in sweep["results"].items()}
        out["history"] = {a: [{"value": r["value"], "mean_distance": _strip_runs(r, False)["mean_distance"]} for r in rs]
                          for a, rs in sweep["results"].items()}
    else:
        json_path = args.json or os.path.join(args.out, "fl.json")
        plot_path = args.plot or os.path.join(args.out, "fl.png")
        result = run_single(config, seeds, progress=not args.no_progress)
        print_single(config, result)
        plot_single(config, result, plot_path)
        stripped = _strip_runs(result, keep_history=True)
        out.update(radius=result["radius"], radius_max=result["radius_max"], radius_std=result["radius_std"],
                   radius_per_seed=result["radius_per_seed"], bounded=result["bounded"], drift=result["drift"],
                   mean_active=result["mean_active"], ms_per_round=result["ms_per_round"],
                   history=stripped["history"])
    out["plot"] = plot_path
    out["seconds"] = time.perf_counter() - started
    with open(json_path, "w") as f:
        json.dump(out, f, indent=1, allow_nan=True)
    print(f"wrote {json_path} and {plot_path} ({out['seconds']:.1f} s)")
    return 0
