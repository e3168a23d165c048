"""MethodSchedule, the one implementation of each method's schedule (JointTrainer and
JointDPOTrainer both use it): what each step trains, MAXRIGHT's gaps, and resumption."""

import math

import pytest

from molkernels.posttrain import METHODS, MethodSchedule


def test_fixed_schedules():
    sequential = MethodSchedule("sequential", 0.25, total_steps=8)
    assert [sequential.weights(t) for t in range(8)] == [{"sft": 1.0}] * 6 + [{"dpo": 1.0}] * 2
    assert MethodSchedule("mix", 0.25).weights(0) == {"sft": 0.75, "dpo": 0.25}
    for method in ("mgda", "moco"):
        assert MethodSchedule(method, 0.25).weights(3) == {"sft": 1.0, "dpo": 1.0}


def test_maxright_picks_the_larger_weighted_gap_and_dpo_on_a_tie():
    schedule = MethodSchedule("maxright", 0.5, sft_opt=1.0, dpo_opt=0.0, max_eval_steps=4)
    assert [schedule.refresh_due(t) for t in range(6)] == [True, False, False, False, True, False]
    assert schedule.weights(0) == {"dpo": 1.0}  # both gaps inf before the first evaluation
    schedule.update_gaps({"sft": 3.0, "dpo": 1.0})
    assert schedule.gaps == {"sft": 1.0, "dpo": 0.5}
    assert schedule.weights(1) == {"sft": 1.0}
    schedule.update_gaps({"sft": 2.0})
    assert schedule.gaps == {"sft": 0.5, "dpo": 0.5} and schedule.weights(2) == {"dpo": 1.0}


def test_alright_resumes_its_draws_identically():
    schedule = MethodSchedule("alright", 0.5, seed=7)
    for t in range(5):
        schedule.weights(t)
    state = schedule.state_dict()
    expected = [schedule.weights(t) for t in range(5, 25)]
    resumed = MethodSchedule("alright", 0.5, seed=7)
    resumed.check_state_dict(state, "state")
    resumed.load_state_dict(state)
    assert [resumed.weights(t) for t in range(5, 25)] == expected
    assert len({tuple(w) for w in expected}) == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="adam"), "method"), (dict(lam=1.5), "lam"), (dict(lam=math.nan), "lam"),
    (dict(method="sequential"), "total_steps"), (dict(total_steps=0), "total_steps"),
    (dict(max_eval_steps=0), "max_eval_steps"), (dict(sft_opt=math.nan), "sft_opt"), (dict(seed=-1), "seed"),
    (dict(seed=2 ** 32), "seed")])
def test_bad_arguments_are_named(kwargs, match):
    kwargs = {"method": "alright", "lam": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        MethodSchedule(kwargs.pop("method"), kwargs.pop("lam"), **kwargs)


def test_bad_state_is_named():
    schedule = MethodSchedule("maxright", 0.5)
    state = schedule.state_dict()
    state["gaps"]["sft"] = math.nan
    with pytest.raises(ValueError, match=r"state\['gaps'\]\['sft'\]"):
        schedule.check_state_dict(state, "state")
    assert set(METHODS) == {"sequential", "mix", "alright", "maxright", "mgda", "moco"}
