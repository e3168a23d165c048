"""Which objectives each step of a joint SFT + DPO run trains, and with what weight: the one
implementation of every method's schedule, shared by JointTrainer and JointDPOTrainer.

With λ ∈ [0, 1] weighing the preference objective and 1 − λ the SFT objective, step t trains

    sequential  {sft: 1} while t < round((1 − λ)·total_steps), then {dpo: 1}
    mix         {sft: 1 − λ, dpo: λ}
    alright     {dpo: 1} with probability λ, else {sft: 1} (one draw per step from the schedule's
                own generator, seeded by `seed`)
    maxright    the objective with the larger weighted optimality gap, (1 − λ)(f_SFT − f*_SFT)
                against λ(f_DPO − f*_DPO) (DPO on a tie); the trained objective's gap is updated from
                the loss just computed, the other one is stale until both are refreshed by a no-grad
                evaluation at every step t with t mod max_eval_steps = 0 (refresh_due)
    mgda, moco  {sft: 1, dpo: 1}: both gradients, weighted afterwards by the fused steps
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from .._checks import check_integer, check_number, check_state_generator, check_state_keys, state_path

METHODS = ("sequential", "mix", "alright", "maxright", "mgda", "moco")
OBJECTIVES = ("sft", "dpo")
SEED_LIMIT = 2 ** 32  # BatchStream seeds its epochs with seed·1000003 + epoch, within torch's 64-bit seeds


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed!r}")
    return seed


class MethodSchedule:
    """The schedule of one method (see the module docstring). sft_opt / dpo_opt: MAXRIGHT's optimal
    values f* (default 0, a lower bound of the losses here); total_steps: the budget `sequential`
    splits (required by it). Arguments are checked here: ValueError naming the bad one.
    state_dict() holds what changes as the run goes (the gaps and ALRIGHT's generator)."""

    def __init__(self, method: str, lam: float, *, total_steps: Optional[int] = None, sft_opt: Optional[float] = None,
                 dpo_opt: Optional[float] = None, max_eval_steps: int = 10, seed: int = 0):
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        self.method = method
        self.lam = check_number("lam", lam, 0.0, 1.0)
        self.optima = {"sft": 0.0 if sft_opt is None else check_number("sft_opt", sft_opt, -math.inf),
                       "dpo": 0.0 if dpo_opt is None else check_number("dpo_opt", dpo_opt, -math.inf)}
        self.max_eval_steps = check_integer("max_eval_steps", max_eval_steps, 1)
        if method == "sequential" and total_steps is None:
            raise ValueError("total_steps: `sequential` splits a step budget between its phases; give total_steps")
        self.total_steps = None if total_steps is None else check_integer("total_steps", total_steps, 1)
        self.generator = torch.Generator().manual_seed(check_seed(seed) + 2)
        self.gaps = {o: math.inf for o in OBJECTIVES}

    def refresh_due(self, step: int) -> bool:
        """Whether step `step` starts with MAXRIGHT's evaluation of both gaps (refresh)."""
        return self.method == "maxright" and step % self.max_eval_steps == 0

    def weights(self, step: int) -> Dict[str, float]:
        """The objectives step `step` trains and their weights in the loss (ALRIGHT: one draw)."""
        if self.method == "sequential":
            return {"sft": 1.0} if step < round((1 - self.lam) * self.total_steps) else {"dpo": 1.0}
        if self.method == "mix":
            return {"sft": 1 - self.lam, "dpo": self.lam}
        if self.method == "alright":
            return {"dpo": 1.0} if torch.rand((), generator=self.generator).item() < self.lam else {"sft": 1.0}
        if self.method == "maxright":
            return {max(OBJECTIVES, key=lambda o: (self.gaps[o], o == "dpo")): 1.0}
        return {"sft": 1.0, "dpo": 1.0}

    def update_gaps(self, losses: Dict[str, float]) -> None:
        """Sets the weighted gap of every objective in `losses` from its loss (a float)."""
        for o, value in losses.items():
            self.gaps[o] = (self.lam if o == "dpo" else 1 - self.lam) * (value - self.optima[o])

    def config(self) -> dict:
        return {"lam": self.lam, "optima": dict(self.optima), "max_eval_steps": self.max_eval_steps,
                "total_steps": self.total_steps}

    def state_dict(self) -> dict:
        return {"gaps": dict(self.gaps), "choice_generator": self.generator.get_state()}

    def check_state_dict(self, state: dict, path: str) -> None:
        """Raises naming the first bad entry: the gaps are numbers (inf before the first evaluation,
        never NaN); the generator state is one the generator accepts."""
        check_state_keys(state["gaps"], state_path(path, "gaps"), OBJECTIVES)
        for o in OBJECTIVES:
            gap = state["gaps"][o]
            if isinstance(gap, bool) or not isinstance(gap, (int, float)) or math.isnan(gap):
                raise ValueError(f"{state_path(state_path(path, 'gaps'), o)}: expected a number, got {gap!r}")
        check_state_generator(state["choice_generator"], state_path(path, "choice_generator"), self.generator)

    def load_state_dict(self, state: dict) -> None:
        """Restores a checked state_dict() (check_state_dict first)."""
        self.gaps = {o: float(state["gaps"][o]) for o in OBJECTIVES}
        self.generator.set_state(state["choice_generator"])
