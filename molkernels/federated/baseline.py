"""The unbatched baseline: the simulator with its local steps as a Python loop over clients, one
torch.optim optimiser per client (what a straightforward simulation does).

`PerClientLoopSimulator` runs the same rounds as OpenFLSimulator (same churn, same fresh objectives,
same batched gradients, same server average, same random draws in the same order) and replaces only
the local optimiser step: for every active client, a torch.optim.Adam (local_adam) or
torch.optim.SGD (local_sgd) over that client's own parameter tensor, kept per slot across rounds and
created afresh when a new client joins (or kept, state_on_join="inherit"). It is the oracle of the
batched kernels inside the simulator (python_tests/federated/test_fl_simulator.py) and the baseline
of `python -m molkernels bench fl_round`. Checkpoints are not supported (the per-client optimisers
are torch.optim objects).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .simulator import OpenFLSimulator


class PerClientLoopSimulator(OpenFLSimulator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        C = self.config.clients
        self.rows: List[torch.nn.Parameter] = [torch.nn.Parameter(self.client_params[c].clone()) for c in range(C)]
        self.optimizers: List[Optional[torch.optim.Optimizer]] = [self._optimizer(c) for c in range(C)]

    def _optimizer(self, c: int) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.algorithm == "local_adam":
            return torch.optim.Adam([self.rows[c]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay)
        return torch.optim.SGD([self.rows[c]], lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)

    def on_join(self, joined: torch.Tensor) -> None:
        super().on_join(joined)  # keeps the (unused) batched state consistent
        if self.config.state_on_join == "reset":
            for c in torch.nonzero(joined).flatten().tolist():
                self.optimizers[c] = self._optimizer(c)

    def local_step(self, grads: torch.Tensor, active: torch.Tensor) -> None:
        for c in torch.nonzero(active).flatten().tolist():
            p = self.rows[c]
            with torch.no_grad():
                p.copy_(self.client_params[c])
            p.grad = grads[c].clone()
            self.optimizers[c].step()
            with torch.no_grad():
                self.client_params[c].copy_(p)

    def state_dict(self):
        raise NotImplementedError("PerClientLoopSimulator: no checkpoints (use OpenFLSimulator)")

    def load_state_dict(self, state):
        """Refused, as state_dict(): OpenFLSimulator's state lacks the per-client torch.optim
        optimisers, so loading it would resume them from the wrong state."""
        raise NotImplementedError("PerClientLoopSimulator: no checkpoints (use OpenFLSimulator)")
