"""The open population: C client slots, clients leaving and joining every round.

A slot holds at most one client at a time. Every client that joins is a new client (a fresh id, fresh
local data, and by default fresh local optimiser state); a client that leaves never comes back.
Each round, before local training, departures and arrivals are drawn from the round's start state
(so a client that leaves cannot rejoin in the same round), with one uniform draw per slot for each:

- ``bernoulli``: every active client leaves with probability ``leave_rate``, independently; every
  empty slot is filled by a new client with probability ``join_rate``, independently. The number of
  active clients is a sum of C independent two-state Markov chains: its stationary mean is
  C·join/(join + leave) and, from any start, it gets there geometrically at rate 1 − join − leave.
- ``replacement``: every active client leaves with probability ``leave_rate`` and a new client takes
  its slot in the same round (so the departing and the joining masks coincide and the number of
  active clients never changes); empty slots, if the population starts with some, fill as in
  ``bernoulli``.

At construction each slot is active with probability ``initial_active`` (default: the stationary
fraction join/(join + leave) for ``bernoulli``, 1 when both rates are 0, and 1 for ``replacement``);
the clients present at round 0 count as joined at round 0.

All randomness comes from the torch.Generator passed in, so the population is deterministic given
its seed, and `state_dict` / `load_state_dict` restore it exactly. The masks stay on the device:
nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .._checks import (check_device, check_number, check_state_keys, check_state_tensor, check_state_values,
                       state_path)

CHURN_MODELS = ("bernoulli", "replacement")
STATE_KEYS = ("model", "join_rate", "leave_rate", "initial_active", "active", "client_id", "age", "next_id")


def check_rate(name: str, value: float) -> float:
    try:
        return check_number(name, value, 0.0, 1.0)
    except ValueError:
        raise ValueError(f"{name}: a probability per round in [0, 1], got {value!r}") from None


def stationary_fraction(model: str, join_rate: float, leave_rate: float) -> float:
    """The long-run expected fraction of active slots under `model`."""
    if model == "replacement" or join_rate + leave_rate == 0.0:
        return 1.0
    return join_rate / (join_rate + leave_rate)


class Population:
    """C slots; `active`, `client_id` (−1 for an empty slot) and `age` (rounds since the client joined)
    are [C] tensors on `device`. `step(generator)` applies one round of churn."""

    def __init__(self, clients: int, *, model: str = "bernoulli", join_rate: float = 0.1, leave_rate: float = 0.1,
                 initial_active: Optional[float] = None, device: torch.device | str = "cpu"):
        if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
            raise ValueError(f"clients: at least 1 client slot, got {clients!r}")
        if not isinstance(model, str) or model not in CHURN_MODELS:
            raise ValueError(f"model: unknown churn model {model!r}; expected one of {', '.join(CHURN_MODELS)}")
        self.clients = clients
        self.model = model
        self.join_rate = check_rate("join_rate", join_rate)
        self.leave_rate = check_rate("leave_rate", leave_rate)
        if initial_active is None:
            initial_active = stationary_fraction(model, self.join_rate, self.leave_rate)
        self.initial_active = check_rate("initial_active", initial_active)
        self.device = check_device("device", device)
        self.active = torch.zeros(clients, dtype=torch.bool, device=self.device)
        self.client_id = torch.full((clients,), -1, dtype=torch.int64, device=self.device)
        self.age = torch.zeros(clients, dtype=torch.int64, device=self.device)
        self.next_id = torch.zeros((), dtype=torch.int64, device=self.device)

    def start(self, generator: torch.Generator) -> torch.Tensor:
        """Round 0: each slot is active with probability `initial_active`; returns the joined mask."""
        u = torch.rand(self.clients, generator=generator, device=self.device)
        joined = u < self.initial_active
        self.active.zero_()
        self.client_id.fill_(-1)
        self.age.zero_()
        self.next_id.zero_()
        self._admit(joined)
        return joined

    def step(self, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """One round of churn: returns (joined, left), bool [C] masks. `joined` are the slots that hold
        a new client from this round on (their data and state must be renewed); `left` are the slots
        whose client departed. Under `replacement` a slot can be in both."""
        u_leave = torch.rand(self.clients, generator=generator, device=self.device)
        u_join = torch.rand(self.clients, generator=generator, device=self.device)
        left = self.active & (u_leave < self.leave_rate)
        arrivals = ~self.active & (u_join < self.join_rate)
        if self.model == "replacement":
            joined = left | arrivals
        else:
            joined = arrivals
        self.age.add_(self.active.to(torch.int64))
        self.active &= ~left
        self.client_id.masked_fill_(left, -1)
        self._admit(joined)
        return joined, left

    def _admit(self, joined: torch.Tensor) -> None:
        ids = self.next_id + torch.cumsum(joined.to(torch.int64), 0) - 1
        self.client_id.copy_(torch.where(joined, ids, self.client_id))
        self.age.masked_fill_(joined, 0)
        self.active |= joined
        self.next_id.add_(joined.sum())

    @property
    def stationary_fraction(self) -> float:
        return stationary_fraction(self.model, self.join_rate, self.leave_rate)

    def state_dict(self) -> Dict[str, object]:
        return {"model": self.model, "join_rate": self.join_rate, "leave_rate": self.leave_rate,
                "initial_active": self.initial_active, "active": self.active.clone(),
                "client_id": self.client_id.clone(), "age": self.age.clone(), "next_id": self.next_id.clone()}

    def check_state_dict(self, state: Dict[str, object], path: str = "state") -> None:
        """Raises TypeError/ValueError naming the first bad entry of `state` (`path` names the
        state itself): exactly the keys of state_dict(), this population's churn model and rates,
        tensors of this population's shapes and dtypes, and consistent slots (an active slot holds a
        client id >= 0 below next_id, each id in one slot only; an empty slot holds -1; ages >= 0)."""
        check_state_keys(state, path, STATE_KEYS)
        for key in ("model", "join_rate", "leave_rate", "initial_active"):
            mine = getattr(self, key)
            if not (isinstance(state[key], type(mine)) and state[key] == mine):
                raise ValueError(f"{state_path(path, key)}: saved {state[key]!r}, this population has {mine!r}")
        for key in ("active", "client_id", "age", "next_id"):
            check_state_tensor(state[key], state_path(path, key), getattr(self, key))
        active, client_id, next_id = state["active"], state["client_id"], state["next_id"]
        check_state_values(state["age"], state_path(path, "age"), low=0)
        check_state_values(next_id, state_path(path, "next_id"), low=0)
        ids = client_id[active]
        check_state_values(ids, state_path(path, "client_id") + " of an active slot", low=0, high=int(next_id) - 1)
        if not bool((client_id[~active] == -1).all()):
            raise ValueError(f"{state_path(path, 'client_id')}: an empty slot must hold -1")
        if torch.unique(ids).numel() != ids.numel():
            raise ValueError(f"{state_path(path, 'client_id')}: a client id held by two slots")

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores a state_dict() of a population with the same slots, churn model and rates:
        checked whole first (check_state_dict), so a bad state raises and changes nothing."""
        self.check_state_dict(state)
        for name in ("active", "client_id", "age", "next_id"):
            getattr(self, name).copy_(state[name])
