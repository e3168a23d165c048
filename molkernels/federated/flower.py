"""Flower adapter: molkernels' local Adam inside a Flower (flwr) ClientApp, for deployments on real
devices, with each client's Adam state kept in Flower's `context.state` across rounds.

    import torch
    from molkernels.federated.flower import LocalAdamClient

    def loss_fn(model, context, step):              # one local mini-batch loss of this client
        x, y = next_batch(context.node_config["partition-id"])
        return torch.nn.functional.cross_entropy(model(x), y)

    client = LocalAdamClient(model_fn=lambda context: Net(), loss_fn=loss_fn,
                             local_steps=5, lr=1e-3, num_examples=lambda context: 500)
    app = client.client_app()                       # a flwr.clientapp.ClientApp: `flwr run` it as usual

On each "train" message the client app:

1. builds the model (model_fn) and loads the server's weights from the message's "arrays" record
   (an ArrayRecord of the model's state_dict, as Flower's FedAvg strategies send it);
2. loads its local Adam state (m, v and the step count) from `context.state[state_key]`, or starts
   fresh (m = v = 0, step = 0) the first time this client trains: the same rule as the simulator's
   reset-on-join (a newly joined device has no state);
3. takes `local_steps` Adam steps, each a molkernels.federated.batched_adam_step on the model's
   trainable parameters as one flat [1, D] row (C = 1: one device is one client), which is
   torch.optim.Adam for this client;
4. writes the state back to `context.state` (it never leaves the device) and replies with the new
   weights ("arrays"), and "metrics" with "num-examples" (FedAvg's weighting key), the mean local
   loss and the client's step count.

The message's "config" record may override "lr" and "local-steps" for the round. Flower keeps
`context.state` per node and run, so the Adam state lives on the client across rounds, as in
molkernels' simulator (simulator.py). `local_adam_train` is the same logic as a plain function of
(model, message content, context.state), for ClientApps that do more.

flwr is imported only when this module is; molkernels does not depend on it.
"""

from __future__ import annotations

from typing import Callable, Dict, Union

import torch

from .._checks import check_integer, check_number
from .kernels import batched_adam_step

STATE_KEY = "molkernels.local_adam"


def _flwr():
    try:
        from flwr import app as flwr_app
        from flwr import clientapp
    except ImportError as error:  # pragma: no cover - exercised only without flwr
        raise ImportError("molkernels.federated.flower needs Flower: pip install flwr") from error
    return flwr_app, clientapp


def _trainable(model: torch.nn.Module):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def load_adam_state(state, D: int, *, key: str = STATE_KEY, dtype=torch.float32, device="cpu"):
    """(exp_avg [1, D], exp_avg_sq [1, D], step [1] int64) from a flwr RecordDict, or fresh zeros
    when it holds none (or one whose exp_avg has another size: the model changed). A saved state
    that is not what save_adam_state writes (other entries, exp_avg_sq or step of other shapes, a
    negative or fractional step, non-finite moments) raises ValueError naming the entry."""
    if key in state:
        saved = state[key].to_torch_state_dict()
        where = f"state[{key!r}]"
        if sorted(saved) != ["exp_avg", "exp_avg_sq", "step"]:
            raise ValueError(f"{where}: holds {sorted(saved)}, expected exp_avg, exp_avg_sq and step")
        if saved["exp_avg"].shape == (1, D):
            if saved["exp_avg_sq"].shape != (1, D) or saved["step"].shape != (1,):
                raise ValueError(f"{where}: exp_avg_sq {tuple(saved['exp_avg_sq'].shape)} and step "
                                 f"{tuple(saved['step'].shape)}, expected (1, {D}) and (1,)")
            step = saved["step"]
            if step.is_floating_point() or step.is_complex() or step.dtype == torch.bool or int(step[0]) < 0:
                raise ValueError(f"{where}['step']: a count >= 0, got {step.tolist()} ({step.dtype})")
            for name in ("exp_avg", "exp_avg_sq"):
                if not bool(torch.isfinite(saved[name]).all()):
                    raise ValueError(f"{where}['{name}']: has non-finite entries")
            if bool((saved["exp_avg_sq"] < 0).any()):
                raise ValueError(f"{where}['exp_avg_sq']: has negative entries")
            return (saved["exp_avg"].to(device=device, dtype=dtype).contiguous(),
                    saved["exp_avg_sq"].to(device=device, dtype=dtype).contiguous(),
                    saved["step"].to(device=device, dtype=torch.int64).contiguous())
    zeros = torch.zeros(1, D, device=device, dtype=dtype)
    return zeros, zeros.clone(), torch.zeros(1, device=device, dtype=torch.int64)


def save_adam_state(state, exp_avg, exp_avg_sq, step, *, key: str = STATE_KEY) -> None:
    flwr_app, _ = _flwr()
    state[key] = flwr_app.ArrayRecord({"exp_avg": exp_avg.detach().cpu(), "exp_avg_sq": exp_avg_sq.detach().cpu(),
                                       "step": step.detach().cpu()})


def local_adam_train(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, int], torch.Tensor], state, *,
                     local_steps: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                     weight_decay: float = 0.0, key: str = STATE_KEY, backend: str = "auto") -> Dict[str, float]:
    """`local_steps` Adam steps on `model`'s trainable parameters (in place), with the optimiser state
    read from and written back to the flwr RecordDict `state`. loss_fn(model, step) -> scalar loss.
    Returns {"train_loss": mean loss, "adam_step": the client's step count}."""
    check_integer("local_steps", local_steps, low=1)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(model, step), got {type(loss_fn).__name__}")
    params = _trainable(model)
    if not params:
        raise ValueError("model: has no trainable parameters")
    dtypes = {p.dtype for _, p in params}
    devices = {p.device for _, p in params}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"model: trainable parameters must share one dtype and device, got {dtypes}, {devices}")
    dtype, device = dtypes.pop(), devices.pop()
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # One flat [1, D] row; the parameters become views of it, so the kernel updates the model.
    flat = torch.cat([p.detach().reshape(-1) for _, p in params]).unsqueeze(0).contiguous()
    D = flat.shape[1]
    offset = 0
    for _, p in params:
        n = p.numel()
        p.data = flat[0, offset:offset + n].view_as(p)
        offset += n
    grads = torch.zeros_like(flat)
    exp_avg, exp_avg_sq, step = load_adam_state(state, D, key=key, dtype=state_dtype, device=device)
    active = torch.ones(1, dtype=torch.bool, device=device)
    losses = []
    for s in range(local_steps):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, s)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn: must return a scalar loss tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
        loss.backward()
        offset = 0
        for _, p in params:
            n = p.numel()
            if p.grad is None:
                grads[0, offset:offset + n].zero_()
            else:
                grads[0, offset:offset + n].copy_(p.grad.reshape(-1))
            offset += n
        batched_adam_step(flat, grads, exp_avg, exp_avg_sq, step, active, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=weight_decay, backend=backend)
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    save_adam_state(state, exp_avg, exp_avg_sq, step, key=key)
    return {"train_loss": sum(losses) / len(losses), "adam_step": int(step[0])}


class LocalAdamClient:
    """A Flower client running molkernels' local Adam (see the module doc).

    model_fn(context) -> torch.nn.Module (its weights are overwritten by the server's);
    loss_fn(model, context, step) -> scalar loss on this client's data;
    num_examples: an int or num_examples(context) -> int, the client's data size (FedAvg's weight).
    """

    def __init__(self, model_fn: Callable, loss_fn: Callable, *, local_steps: int = 1, lr: float = 1e-3,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 num_examples: Union[int, Callable] = 1, state_key: str = STATE_KEY, backend: str = "auto"):
        for name, value in (("model_fn", model_fn), ("loss_fn", loss_fn)):
            if not callable(value):
                raise TypeError(f"{name}: expected a callable, got {type(value).__name__}")
        check_integer("local_steps", local_steps, low=1)
        check_number("lr", lr, 0.0)
        check_number("beta1", beta1, 0.0, 1.0, high_open=True)
        check_number("beta2", beta2, 0.0, 1.0, high_open=True)
        check_number("eps", eps, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        if not callable(num_examples):
            check_integer("num_examples", num_examples, low=0)
        if not isinstance(state_key, str) or not state_key:
            raise ValueError(f"state_key: a non-empty string, got {state_key!r}")
        if not isinstance(backend, str):
            raise ValueError(f"backend: a backend name, got {backend!r}")
        self.model_fn, self.loss_fn = model_fn, loss_fn
        self.local_steps, self.lr = local_steps, lr
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.num_examples, self.state_key, self.backend = num_examples, state_key, backend

    def train(self, message, context):
        """The ClientApp's train function: Message -> reply Message."""
        flwr_app, _ = _flwr()
        content = message.content
        config = content["config"] if "config" in content else {}
        lr = check_number("config['lr']", config["lr"], 0.0) if "lr" in config else self.lr
        local_steps = check_integer("config['local-steps']", config["local-steps"], low=1) if "local-steps" in config \
            else self.local_steps
        model = self.model_fn(context)
        if "arrays" in content:
            model.load_state_dict(content["arrays"].to_torch_state_dict())
        stats = local_adam_train(model, lambda m, s: self.loss_fn(m, context, s), context.state,
                                 local_steps=local_steps, lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                                 weight_decay=self.weight_decay, key=self.state_key, backend=self.backend)
        n = check_integer("num_examples", self.num_examples(context), low=0) if callable(self.num_examples) \
            else self.num_examples
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        reply = flwr_app.RecordDict({
            "arrays": flwr_app.ArrayRecord(weights),
            "metrics": flwr_app.MetricRecord({"num-examples": int(n), "train_loss": stats["train_loss"],
                                              "adam_step": stats["adam_step"]}),
        })
        return flwr_app.Message(reply, reply_to=message)

    def client_app(self):
        """A flwr ClientApp whose train function is `self.train`."""
        _, clientapp = _flwr()
        app = clientapp.ClientApp()
        app.train()(self.train)
        return app
