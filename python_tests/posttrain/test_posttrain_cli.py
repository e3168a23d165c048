"""`python -m molkernels posttrain` end to end at tiny sizes: the offline default and a local HF
model directory with JSONL data."""

from __future__ import annotations

import json

import pytest

from molkernels.__main__ import main
from molkernels.posttrain.experiment import claims
from molkernels.posttrain.synthetic import make_data, tiny_bpe_tokenizer, tiny_llama

FIELDS = ("sft_loss", "dpo_loss", "sft_gap", "dpo_gap", "ideal_distance", "seconds_per_step", "step_cost_ratio",
          "peak_mem_bytes")
TINY = ["--steps", "4", "--eval-every", "2", "--train-records", "16", "--eval-records", "6", "--batch-size", "4"]


def test_default_run_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["posttrain", "--out", str(out), "--seed", "3", *TINY]) == 0
    result = json.loads((out / "posttrain.json").read_text())
    assert (out / "posttrain.png").stat().st_size > 10_000
    assert list(result["methods"]) == ["sequential", "mix", "alright", "maxright", "mgda", "moco"]
    for method, r in result["methods"].items():
        for field in FIELDS:
            assert isinstance(r[field], (int, float)) and r[field] == r[field], (method, field)
        assert r["sft_gap"] == pytest.approx(r["sft_loss"] - result["ideal"]["sft_loss"])
        assert r["ideal_distance"] == pytest.approx((r["sft_gap"] ** 2 + r["dpo_gap"] ** 2) ** 0.5)
        assert [p["step"] for p in r["path"]] == [0, 2, 4]
    assert result["methods"]["sequential"]["dpo_step_fraction"] == 0.5
    assert result["methods"]["mix"]["dpo_step_fraction"] == 1.0
    assert result["methods"]["mix"]["step_cost_ratio"] > 0      # against an SFT step plus a DPO step
    assert set(result["plain_step_median_seconds"]) == {"sft", "dpo", "dpo+sft"}
    assert len(result["methods"]["mgda"]["final_weights"]) == 2
    assert set(result["claims"]) >= {"alright_closer_than_sequential", "alright_at_most_5pct_above_one_objective"}
    assert "ideal point" in capsys.readouterr().out


def test_several_seeds_report_means_and_per_seed_claims(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["posttrain", "--out", str(out), "--seed", "5", "--seeds", "2", "--methods", "sequential,alright",
                 *TINY]) == 0
    result = json.loads((out / "posttrain.json").read_text())
    assert result["seeds"] == [5, 6] and len(result["ideal_per_seed"]) == 2
    for r in result["methods"].values():
        for field in FIELDS:
            values = r["per_seed"][field]
            assert len(values) == 2 and r[field] == pytest.approx(sum(values) / 2)
            assert r[f"{field}_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert 0 <= result["claims_held_in_seeds"]["alright_closer_than_sequential"] <= 2
    assert "claims held in seeds (of 2)" in capsys.readouterr().out


def test_reference_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    from molkernels.posttrain import experiment

    made = []
    original = experiment.precompute_reference_logps

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(experiment, "precompute_reference_logps", spy)
    cache = tmp_path / "cache"
    common = ["--methods", "mix,alright", "--seed", "2", *TINY]
    assert main(["posttrain", "--out", str(tmp_path / "plain"), *common]) == 0
    assert made == []
    for run in ("first", "second"):
        assert main(["posttrain", "--out", str(tmp_path / run), "--reference-cache", str(cache), *common]) == 0
    assert [m.reused for m in made] == [False, False, True, True]  # training and held-out pairs, then reused
    assert sorted(p.name for p in cache.iterdir()) == sorted({m.path.split("/")[-1] for m in made})
    plain, first, second = (json.loads((tmp_path / run / "posttrain.json").read_text())["methods"]
                            for run in ("plain", "first", "second"))
    for method in ("mix", "alright"):
        assert first[method]["dpo_loss"] == second[method]["dpo_loss"]
        assert first[method]["dpo_loss"] == pytest.approx(plain[method]["dpo_loss"], rel=1e-4)


def test_local_model_directory_and_jsonl_data(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama(0, hidden_size=16, layers=1, heads=2).save_pretrained(model_dir)
    sft, pref = make_data(12, 12, seed=4)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    args = ["posttrain", "--model", str(model_dir), "--tokenizer", "byte", "--sft-data", str(tmp_path / "sft.jsonl"),
            "--pref-data", str(tmp_path / "pref.jsonl"), "--methods", "alright,mgda", "--normalize", "loss+", "--steps", "2",
            "--eval-every", "1", "--batch-size", "2", "--eval-fraction", "0.25", "--json", str(tmp_path / "r.json"),
            "--plot", str(tmp_path / "r.png"), "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["methods"]) == ["alright", "mgda"] and result["model"] == str(model_dir)
    assert result["normalize"] == "loss+"
    assert result["claims"]["alright_closer_than_sequential"] is None   # sequential was not run


def test_local_model_with_its_own_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    sft, pref = make_data(12, 12, seed=5)
    tokenizer = tiny_bpe_tokenizer([r["prompt"] + r["completion"] for r in sft] + [r["chosen"] for r in pref],
                                     model_dir)
    tiny_llama(0, hidden_size=16, layers=1, heads=2, tokenizer=tokenizer).save_pretrained(model_dir)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    assert main(["posttrain", "--model", str(model_dir), "--sft-data", str(tmp_path / "sft.jsonl"),
                 "--pref-data", str(tmp_path / "pref.jsonl"), "--methods", "mix", "--steps", "2", "--eval-every", "2",
                 "--batch-size", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "posttrain.json").read_text())
    assert result["methods"]["mix"]["sft_loss"] < 6.5   # ~log(300) at random init: scored with the BPE ids


def test_hf_tokenizer_wrapper(tmp_path):
    from molkernels.posttrain import HFTokenizer

    fast = tiny_bpe_tokenizer(["translate: sun moon\n=> abc def"] * 4, tmp_path)
    wrapped = HFTokenizer(fast)
    assert wrapped.eos_token_id == fast.eos_token_id and wrapped.pad_token_id == fast.pad_token_id
    ids = wrapped("translate: sun")
    assert fast.decode(ids) == "translate: sun" and fast.eos_token_id not in ids


def test_bad_command_lines(tmp_path):
    with pytest.raises(SystemExit, match="--methods: unknown \\['dpo'\\]"):
        main(["posttrain", "--methods", "alright,dpo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--seeds: at least 1"):
        main(["posttrain", "--seeds", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--model: also give --sft-data and --pref-data"):
        main(["posttrain", "--model", str(tmp_path), "--out", str(tmp_path)])


def test_claims_from_results():
    results = {"sequential": {"ideal_distance": 3.0, "seconds_per_step": 1.0, "step_cost_ratio": 1.0},
               "alright": {"ideal_distance": 1.0, "seconds_per_step": 1.04, "step_cost_ratio": 1.04},
               "maxright": {"ideal_distance": 4.0, "seconds_per_step": 1.0, "step_cost_ratio": 1.0},
               "mix": {"ideal_distance": 0.5, "seconds_per_step": 2.0, "step_cost_ratio": 1.0}}
    verdict = claims(results)
    assert verdict["alright_closer_than_sequential"] is True
    assert verdict["maxright_closer_than_sequential"] is False
    assert verdict["alright_at_most_5pct_above_one_objective"] is True
    assert verdict["mix_costs_more_than_alright"] is True
    slow = {**results, "alright": {"ideal_distance": 1.0, "seconds_per_step": 1.06, "step_cost_ratio": 1.06}}
    assert claims(slow)["alright_at_most_5pct_above_one_objective"] is False
