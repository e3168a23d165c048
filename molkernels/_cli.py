"""What the commands of `python -m molkernels` share: a parser whose errors end the program with an
argparse `error:` line and exit status 2, and argument types that check each value as it is parsed.

Bad input is found before any work starts: a value an argument type rejects is a parse error
("argument --repeats: at least 1, got 0"); what needs several arguments together is the command's
`check(args)`, whose ValueError becomes the same kind of error line (see molkernels/__main__.py).
Output paths are checked writable up front, so that a long run never ends by losing its results.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional, Sequence

# numpy's seeds are below 2**32, torch's below 2**64: a seed in this range works for every generator.
MAX_SEED = 2**32 - 1


class UsageError(ValueError, SystemExit):
    """Bad command-line input, raised by `Parser.error` after its `error:` line was printed.

    A SystemExit with status 2 (argparse's status for a usage error), so `python -m molkernels`
    exits with it and prints no traceback; also a ValueError, so that code calling
    `molkernels.__main__.main(argv)` can catch bad input as the bad value it is. str() is the
    message without the program name."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError (the usage and `PROG: error: MESSAGE` on
    stderr, exit status 2); its subparsers are Parsers too."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise UsageError(message)


def int_range(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """An argument type: an integer in [low, high] (high None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"at most {high}, got {value}")
        return value

    return parse


def float_range(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """An argument type: a finite number in [low, high]; low_open / high_open exclude the bound."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"a finite number, got {text!r}")
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{'greater than' if low_open else 'at least'} {low:g}, got {text}")
        if value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"{'less than' if high_open else 'at most'} {high:g}, got {text}")
        return value

    return parse


positive_int = int_range(1)
seed = int_range(0, MAX_SEED)
nonnegative_float = float_range(0.0)
probability = float_range(0.0, 1.0)


def names(choices: Sequence[str]) -> Callable[[str], list]:
    """An argument type: a comma-separated list of distinct names from `choices`, in the order given."""
    def parse(text: str) -> list:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; expected a comma-separated subset of "
                                             f"{','.join(choices)}")
        if not chosen:
            raise argparse.ArgumentTypeError(f"no names in {text!r}; expected a comma-separated subset of "
                                             f"{','.join(choices)}")
        repeated = sorted({name for name in chosen if chosen.count(name) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once in {text!r}")
        return chosen

    return parse


def device(text: str) -> str:
    """An argument type: `cpu`, `cuda` or `cuda:N`, a device that exists here (returned as given)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; expected cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}, but no CUDA device is visible "
                                             f"(torch.cuda.is_available() is False)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}, but only {torch.cuda.device_count()} CUDA device(s) "
                                             f"are visible")
    return text


def _folder_problem(folder: str) -> Optional[str]:
    """Why files cannot be written in `folder`, or None."""
    if os.path.isdir(folder):
        return None if os.access(folder, os.W_OK | os.X_OK) else f"no permission to write in {folder!r}"
    if os.path.exists(folder):
        return f"{folder!r} is not a folder"
    return f"the folder {folder!r} does not exist"


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _file_problem(path: str, *, create_folder: bool) -> Optional[str]:
    """Why the file `path` cannot be written (create_folder: its missing folders would be created), or None."""
    if os.path.isdir(path):
        return "it is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    problem = _folder_problem(_nearest_existing(folder) if create_folder else folder)
    if problem is None and os.path.exists(path) and not os.access(path, os.W_OK):
        problem = "no permission to write it"
    return problem


def output_file(text: str) -> str:
    """An argument type: a file path that can be written now: not a folder, in an existing writable
    folder (an existing file is replaced, so it must be writable too)."""
    problem = _file_problem(text, create_folder=False)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {problem}")
    return text


def output_folder(text: str) -> str:
    """An argument type: a folder that exists and is writable, or that can be created (its nearest
    existing ancestor is a writable folder)."""
    problem = _folder_problem(_nearest_existing(text))
    if problem is not None:
        raise argparse.ArgumentTypeError(f"cannot write in {text!r}: {problem}")
    return text


def check_default_output(option: str, path: str) -> None:
    """ValueError naming `option` unless its default file `path` can be written (creating its folders)."""
    problem = _file_problem(path, create_folder=True)
    if problem is not None:
        raise ValueError(f"{option}: cannot write the default {path!r}: {problem}")


def existing_file(text: str) -> str:
    """An argument type: a file that exists."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file" if os.path.isdir(text)
                                         else f"no such file {text!r}")
    return text


def existing_folder(text: str) -> str:
    """An argument type: a folder that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder" if os.path.exists(text)
                                         else f"no such folder {text!r}")
    return text


def check_backend(backend: str, device_name: str) -> None:
    """ValueError naming --backend unless the molkernels backend `backend` runs on `device_name`'s tensors."""
    import torch

    from . import _ops

    reason = None if backend == "auto" else _ops.unavailable_reason(backend)
    if reason is None:
        try:
            _ops.resolve_backend(backend, torch.device(device_name))
        except (ValueError, RuntimeError) as error:
            reason = str(error)
    if reason is not None:
        raise ValueError(f"--backend: {reason}")
