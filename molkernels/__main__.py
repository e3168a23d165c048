"""The command line: `python -m molkernels <command>` (or the `molkernels` console script).

    python -m molkernels demo [--out DIR]
    python -m molkernels bench {gram,combine,min_norm,mgda,all} [--device cuda] [--dtype bfloat16] ...

A command is a module with two functions, `add_arguments(parser)` and `run(args) -> int` (the exit
status), and optionally `check(args)`, which raises ValueError for what the argument types alone
cannot check (combinations of arguments) and runs before `run`. Adding one is one line in COMMANDS;
keep the module's heavy imports inside `run`, since every command module is imported to build the
parser.

Bad input (an argument that an argument type of molkernels._cli rejects, or a ValueError of
`check`) ends the program before any work starts: the usage and `PROG: error: MESSAGE` on stderr,
exit status 2, no traceback; `main` raises it as molkernels._cli.UsageError.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from ._cli import Parser

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("molkernels.demo", "check every backend against the reference, time it against torch, plot Gram throughput"),
    "bench": ("molkernels.bench", "benchmark an op against torch baselines (table, CSV, optional markdown)"),
    "toy": ("molkernels.toy", "reproduce the MoCo/MoDo toy claims and a small multi-task network (JSON, PNG)"),
    "fl": ("molkernels.federated.cli",
           "open federated learning under churn: local SGD/Adam, the stability radius against κ and σ (JSON, PNG)"),
    "posttrain": ("molkernels.posttrain.experiment",
                  "joint SFT + DPO post-training: Sequential, Mix, ALRIGHT, MAXRIGHT, MGDA, MoCo (JSON, Pareto PNG)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m molkernels", description="molkernels: fused kernels for multi-objective learning")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run, _check=getattr(module, "check", None), _parser=command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args._check is not None:
        try:
            args._check(args)
        except ValueError as error:
            args._parser.error(str(error))
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
