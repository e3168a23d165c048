"""The worker of test_posttrain_ranks.py: every rank of a spawned gloo world trains every method
with JointTrainer (a plain, a DDP-wrapped and an FSDP2 fully_shard-ed policy) and rank 0 saves the
trained parameters, what the FSDP2 runs sent, and the outcome of the FSDP2 checks."""

import copy
import io
import os

import torch
import torch.distributed as dist

from molkernels.distributed import record_collectives
from molkernels.posttrain import JointTrainer, METHODS
from molkernels.posttrain.synthetic import make_data

STEPS = 20
SFT, PREF = make_data(24, 24, seed=7)
# Responses of very different lengths, so that token-weighting across ranks and micro-batches matters.
SFT = [{"prompt": r["prompt"], "completion": r["completion"] * (1 + (i * 5) % 4)} for i, r in enumerate(SFT)]
WRAPPINGS = ("plain", "ddp", "fsdp2")
FSDP_UNITS = 2  # fully_shard(embed), fully_shard(out): the two modules whose gradients FSDP2 reduce-scatters
GRAD_ACCUM = 2


def fsdp2_unavailable_reason():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError as error:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): {error}"
    return None


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 258, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(torch.tanh(h))


def fsdp2_model(seed: int = 0):
    """(the fully_shard-ed TinyLM, a plain frozen copy of its initial weights as the reference):
    FSDP2 cannot be deep-copied, so its reference is passed."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = TinyLM()
    reference = copy.deepcopy(model)
    fully_shard(model.embed)
    fully_shard(model.out)
    fully_shard(model)
    return model, reference


def flat_parameters(model) -> torch.Tensor:
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def make_trainer(method: str, batch_size: int, wrapping: str = "plain", *, seed: int = 0, momentum: float = 0.0):
    torch.manual_seed(seed)
    reference = None
    if wrapping == "fsdp2":
        model, reference = fsdp2_model(seed)
        policy = model
    else:
        model = TinyLM()
        policy = torch.nn.parallel.DistributedDataParallel(model) if wrapping == "ddp" else model
    trainer = JointTrainer(policy, torch.optim.SGD(policy.parameters(), lr=0.5, momentum=momentum), SFT, PREF,
                           reference=reference, method=method, batch_size=batch_size, grad_accum=GRAD_ACCUM,
                           total_steps=STEPS, max_eval_steps=3, lam=0.4, progress=False)
    return trainer, model


def train(method: str, batch_size: int, wrapping: str = "plain"):
    """(the trained parameters, the objectives of each step, what an FSDP2 run sent: the number of
    reduce_scatters and the largest all_reduce in elements; None otherwise)."""
    trainer, model = make_trainer(method, batch_size, wrapping)
    sent = None
    if wrapping == "fsdp2":
        with record_collectives() as calls:
            trainer.train(STEPS)
        all_reduced = [sum(t.numel() for t in tensors) for name, tensors in calls if name == "all_reduce"]
        sent = {"reduce_scatters": sum(name == "reduce_scatter_single" for name, _ in calls),
                "largest_all_reduce": max(all_reduced, default=0)}
    else:
        trainer.train(STEPS)
    return flat_parameters(model), [r["trained"] for r in trainer.history], sent


def fsdp2_resume(method: str, batch_size: int) -> dict:
    """An FSDP2 run checkpointed after half the steps (each rank its own state, through torch.save),
    resumed into a trainer built on differently initialised weights, against the straight run:
    the largest difference of the parameters after STEPS steps (SGD with momentum, so that the
    optimizer's DTensor state matters), and the error that loading the policy's full (unsharded)
    tensors instead of its DTensor shards raises."""
    straight, model = make_trainer(method, batch_size, "fsdp2", momentum=0.9)
    straight.train(STEPS)
    first, _ = make_trainer(method, batch_size, "fsdp2", momentum=0.9)
    first.train(STEPS // 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    resumed, resumed_model = make_trainer(method, batch_size, "fsdp2", seed=1, momentum=0.9)
    plain = {**state, "policy": {k: v.full_tensor() for k, v in state["policy"].items()}}
    try:
        resumed.load_state_dict(plain)
        refused = "accepted"
    except (TypeError, ValueError) as error:
        refused = f"{type(error).__name__}: {error}"
    resumed.load_state_dict(state)
    resumed.train(STEPS - STEPS // 2)
    assert [r["trained"] for r in resumed.history] == [r["trained"] for r in straight.history]
    return {"difference": float((flat_parameters(resumed_model) - flat_parameters(model)).abs().max()),
            "plain_state": refused}


def fsdp2_refusals() -> list:
    """The bad FSDP2 inputs JointTrainer refuses: (what, the error's message) for each."""
    from torch.distributed.fsdp import fully_shard

    outcomes = []

    def refused(what, make):
        try:
            make()
        except (TypeError, ValueError) as error:
            outcomes.append((what, f"{type(error).__name__}: {error}"))
        else:
            outcomes.append((what, "accepted"))

    def build(policy, **kwargs):
        return JointTrainer(policy, torch.optim.SGD(policy.parameters(), lr=0.1), SFT, PREF, progress=False, **kwargs)

    model, _ = fsdp2_model()
    refused("reference=None", lambda: build(model))
    sub = TinyLM()
    fully_shard(sub.embed)  # a submodule only: the root is not fully_shard-ed
    refused("fully_shard on a submodule only", lambda: build(sub, reference=TinyLM()))
    other = TinyLM()
    fully_shard(other)
    rank_zero = dist.new_group([0])  # every rank creates it; only rank 0 (which reports) is in it
    if dist.get_rank() == 0:
        refused("a process_group other than the mesh's",
                lambda: build(other, reference=TinyLM(), process_group=rank_zero))
    return outcomes


def main(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fsdp2 = fsdp2_unavailable_reason() is None
    results = {"fsdp2": fsdp2}
    for method in METHODS:
        for wrapping in WRAPPINGS:
            if wrapping != "fsdp2" or fsdp2:
                results[(method, wrapping)] = train(method, 2, wrapping)
    if fsdp2 and world == 2:
        results["resume"] = {method: fsdp2_resume(method, 2) for method in ("moco", "maxright")}
        results["refusals"] = fsdp2_refusals()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
