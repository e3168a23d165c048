"""Reference log-probabilities cached on disk under a fingerprint of the reference weights, its
config and the tokenised data: reused across runs and methods, recomputed when any changes."""

import copy

import pytest
import torch

from molkernels.posttrain import ByteTokenizer, JointTrainer, PreferenceDataset, precompute_reference_logps
from molkernels.posttrain.synthetic import make_data, tiny_llama

_, PREF = make_data(4, 10, seed=5)
SFT, _ = make_data(10, 4, seed=6)


class CountingForwards:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def dataset(records=PREF, **kwargs):
    return PreferenceDataset(records, ByteTokenizer(), **kwargs)


def test_second_run_reuses_the_cache_without_a_forward(tmp_path):
    model = tiny_llama(0, hidden_size=32, layers=1, heads=2)
    first = dataset()
    made = precompute_reference_logps(model, first, batch_size=4, cache_dir=tmp_path)
    assert not made.reused and made.path.startswith(str(tmp_path))
    counter = CountingForwards(model)
    again = dataset()
    reused = precompute_reference_logps(model, again, batch_size=3, cache_dir=tmp_path)
    assert reused == (made.path, True) and counter.calls == 0
    assert torch.equal(again.reference_logps, first.reference_logps)
    assert again.reference_logps.shape == (len(PREF), 2) and torch.isfinite(again.reference_logps).all()
    # Without a cache every call scores the data.
    assert precompute_reference_logps(model, dataset()) == (None, False) and counter.calls > 0


def test_a_change_of_weights_config_or_tokens_recomputes(tmp_path):
    model = tiny_llama(0, hidden_size=32, layers=1, heads=2)
    base = precompute_reference_logps(model, dataset(), cache_dir=tmp_path)
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3
    reconfigured = copy.deepcopy(model)
    reconfigured.config.rms_norm_eps = 1e-3
    records = [dict(r) for r in PREF]
    records[3]["rejected"] += " x"
    for other_model, other_data in ((nudged, dataset()), (reconfigured, dataset()), (model, dataset(records)),
                                    (model, dataset(max_length=40))):
        result = precompute_reference_logps(other_model, other_data, cache_dir=tmp_path)
        assert not result.reused and result.path != base.path
    # A tokenizer that gives the same ids is the same data: reused.
    class SameIds(ByteTokenizer):
        pass

    same = PreferenceDataset(PREF, SameIds())
    assert precompute_reference_logps(model, same, cache_dir=tmp_path) == (base.path, True)


@pytest.mark.parametrize("damage", ["garbage", "wrong shape", "nan", "other fingerprint"])
def test_a_bad_cache_file_is_recomputed_and_replaced(tmp_path, damage):
    model = tiny_llama(0, hidden_size=32, layers=1, heads=2)
    good = dataset()
    path = precompute_reference_logps(model, good, cache_dir=tmp_path).path
    saved = torch.load(path, weights_only=True)
    if damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
    else:
        if damage == "wrong shape":
            saved["logps"] = saved["logps"][:-1]
        elif damage == "nan":
            saved["logps"][2, 1] = float("nan")
        else:
            saved["fingerprint"] = "0" * 64
        torch.save(saved, path)
    again = dataset()
    assert precompute_reference_logps(model, again, cache_dir=tmp_path) == (path, False)
    assert torch.equal(again.reference_logps, good.reference_logps)
    assert precompute_reference_logps(model, dataset(), cache_dir=tmp_path) == (path, True)


def test_cached_scores_train_like_the_reference_model(tmp_path):
    model = tiny_llama(1, hidden_size=32, layers=1, heads=2)
    reference = copy.deepcopy(model).eval()
    cached = dataset()
    precompute_reference_logps(reference, cached, cache_dir=tmp_path)
    records = []
    for pref_data, ref in ((cached, None), (PREF, reference)):
        policy = copy.deepcopy(model)
        trainer = JointTrainer(policy, torch.optim.SGD(policy.parameters(), lr=0.1), SFT, pref_data, reference=ref,
                               method="mix", batch_size=4, progress=False)
        assert trainer.reference == "precomputed" if ref is None else trainer.reference is ref
        records.append(trainer.step())
    assert records[0]["dpo_loss"] == pytest.approx(records[1]["dpo_loss"], rel=1e-5)


def test_bad_cache_dir():
    with pytest.raises(TypeError, match="cache_dir"):
        precompute_reference_logps(tiny_llama(0, hidden_size=32, layers=1, heads=2), dataset(), cache_dir=3)
