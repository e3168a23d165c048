"""Every command's bad input is a usage error: exit status 2, one argparse `error:` line on stderr
that names the argument, no traceback, and no output file or folder left behind. The whole table
runs in-process through `main` (what `python -m molkernels` runs; a traceback there would be any
exception other than SystemExit(2)); one case per command, and `--help`, run as a user runs them,
in a subprocess. Each case passes tiny sizes, so that a missing check shows up as a failure (a
finished run) rather than as a long benchmark."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from molkernels.__main__ import main

TIMEOUT_S = 120  # importing torch takes seconds on a loaded machine; a parse error needs nothing more

BENCH = ["bench", "gram", "--K", "2", "--d", "64", "--repeats", "1", "--blocks", "1"]
FL = ["fl", "--clients", "2", "--dim", "2", "--rounds", "2", "--local-steps", "1", "--seeds", "1", "--no-progress"]
POSTTRAIN = ["posttrain", "--methods", "sequential", "--steps", "1", "--eval-every", "1", "--train-records", "2",
             "--eval-records", "1", "--batch-size", "1", "--max-length", "64"]
TOY = ["toy", "--experiment", "bias", "--steps", "10", "--seeds", "1"]

# (argv, what stderr must contain: the argument's name). {tmp} is the test's folder (the working
# directory of the command), holding the file `afile` and the folder `adir`.
CASES = [
    (["bench", "gram", "--d", "inf", "--K", "2"], "--d:"),
    (BENCH + ["--d", "nan"], "--d:"),
    (BENCH + ["--repeats", "0"], "--repeats:"),
    (BENCH + ["--K", "0"], "--K:"),
    (BENCH + ["--K", "2,0"], "--K:"),
    (BENCH + ["--threads", "-1"], "--threads:"),
    (BENCH + ["--dtype", "float8"], "--dtype:"),
    (BENCH + ["--device", "cuda:99"], "--device:"),
    (BENCH + ["--csv", "{tmp}/adir"], "--csv:"),
    (BENCH + ["--markdown", "{tmp}/missing/bench.md"], "--markdown:"),
    (FL + ["--kappa", "nan"], "kappa:"),
    (FL + ["--join-rate", "1.5"], "join_rate:"),
    (FL + ["--clients", "0"], "clients:"),
    (FL + ["--rounds", "1"], "--rounds:"),
    (FL + ["--seeds", "0"], "--seeds:"),
    (FL + ["--seed", "-1"], "--seed:"),
    (FL + ["--sweep", "kappa=1,a"], "--sweep:"),
    (FL + ["--sweep", "clients=2,0"], "--sweep:"),
    (FL + ["--dtype", "float16"], "dtype:"),
    (FL + ["--device", "cuda:99"], "--device:"),
    (FL + ["--backend", "nope"], "backend:"),
    (FL + ["--dataset", "digits"], "--dataset:"),
    (FL + ["--json", "{tmp}/missing/fl.json"], "--json:"),
    (FL + ["--plot", "{tmp}/adir"], "--plot:"),
    (FL + ["--out", "{tmp}/afile"], "--out:"),
    (POSTTRAIN + ["--lam", "1.5"], "--lam:"),
    (POSTTRAIN + ["--beta", "nan"], "--beta:"),
    (POSTTRAIN + ["--lr", "-1"], "--lr:"),
    (POSTTRAIN + ["--seeds", "0"], "--seeds:"),
    (POSTTRAIN + ["--methods", "alright,dpo"], "--methods:"),
    (POSTTRAIN + ["--model", "{tmp}/missing"], "--model:"),
    (POSTTRAIN + ["--model", "{tmp}/adir"], "--model:"),
    (POSTTRAIN + ["--model", "{tmp}/adir", "--sft-data", "{tmp}/afile", "--pref-data", "{tmp}/afile"], "--model:"),
    (POSTTRAIN + ["--max-length", "8"], "--max-length:"),
    (POSTTRAIN + ["--sft-data", "{tmp}/afile"], "--sft-data:"),
    (POSTTRAIN + ["--device", "tpu"], "--device:"),
    (POSTTRAIN + ["--backend", "nope"], "--backend:"),
    (POSTTRAIN + ["--json", "{tmp}/adir"], "--json:"),
    (TOY + ["--steps", "5"], "--steps:"),
    (TOY + ["--seed", "-1"], "--seed:"),
    (["toy", "--experiment", "mtl", "--seeds", "1", "--mtl-steps", "0"], "--mtl-steps:"),
    (TOY + ["--plot", "{tmp}/afile/toy.png"], "--plot:"),
    (["demo", "--sections", "correctness", "--out", "{tmp}/afile/demo"], "--out:"),
]


# The first case of each command, for the subprocess test: the exit status and stderr the user sees.
SUBPROCESS_CASES = [next(case for case in CASES if case[0][0] == command)
                    for command in ("bench", "fl", "posttrain", "toy", "demo")]


def tree(root):
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, folders, files in os.walk(root) for name in folders + files)


def prepare(tmp_path, argv):
    """The test folder with `afile` and `adir`, its listing, and argv with {tmp} filled in."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "adir").mkdir()
    return tree(tmp_path), [arg.replace("{tmp}", str(tmp_path)) for arg in argv]


def the_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if " error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def case_id(case):
    argv = case[0]
    return " ".join(argv[:2] + argv[-2:])


@pytest.mark.parametrize("argv, name", CASES, ids=[case_id(c) for c in CASES])
def test_bad_argument_is_a_usage_error(tmp_path, monkeypatch, capsys, argv, name):
    before, argv = prepare(tmp_path, argv)
    monkeypatch.chdir(tmp_path)  # where the default outputs would go
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2, caught.value
    assert name in the_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("argv, name", SUBPROCESS_CASES, ids=[case_id(c) for c in SUBPROCESS_CASES])
def test_bad_argument_in_a_subprocess(tmp_path, argv, name):
    before, argv = prepare(tmp_path, argv)
    result = subprocess.run([sys.executable, "-m", "molkernels", *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert name in the_error_line(result.stderr) and result.stdout == ""
    assert tree(tmp_path) == before


@pytest.mark.parametrize("sft_lines, name", [
    (['{"prompt": "a", "completion": "b"}', "not json"], "--sft-data: line 2 of"),
    (['{"prompt": "a"}'], "--sft-data: record 0 is missing the field 'completion'"),
    (['{"prompt": "a long prompt of many bytes", "completion": "b"}'], "--sft-data: record 0 prompt has"),
])
def test_posttrain_data_files_are_checked_before_training(tmp_path, monkeypatch, capsys, sft_lines, name):
    from molkernels.posttrain.synthetic import tiny_llama

    tiny_llama(0, hidden_size=16, layers=1, heads=2).config.save_pretrained(tmp_path / "model")  # no weights
    (tmp_path / "sft.jsonl").write_text("\n".join(sft_lines) + "\n")
    (tmp_path / "pref.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 4)
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(POSTTRAIN + ["--model", "model", "--tokenizer", "byte", "--sft-data", "sft.jsonl",
                          "--pref-data", "pref.jsonl", "--max-length", "16"])
    assert caught.value.code == 2
    assert name in the_error_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible CUDA device")
def test_cuda_device_without_a_gpu_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(BENCH + ["--device", "cuda"])
    assert caught.value.code == 2
    assert "argument --device: 'cuda', but no CUDA device is visible" in the_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", [[], ["bench"], ["fl"], ["posttrain"], ["toy"], ["demo"]])
def test_help_of_every_command(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as caught:
        main(command + ["--help"])
    out, err = capsys.readouterr()
    assert caught.value.code == 0 and out.startswith("usage: python -m molkernels") and err == ""
    assert tree(tmp_path) == []


def test_python_m_help_exits_0(tmp_path):
    result = subprocess.run([sys.executable, "-m", "molkernels", "fl", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0 and "--sweep" in result.stdout and result.stderr == ""


def test_usage_error_is_also_a_value_error(capsys):
    """Code that calls main() can catch bad input as a ValueError."""
    with pytest.raises(ValueError, match="--repeats: at least 1, got 0"):
        main(BENCH + ["--repeats", "0"])
    assert "python -m molkernels bench: error: argument --repeats: at least 1, got 0" in capsys.readouterr().err
