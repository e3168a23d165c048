"""The worker of test_posttrain_ranks.py: every rank of a spawned gloo world trains every method
with JointTrainer (a plain and a DDP-wrapped policy) and rank 0 saves the trained parameters."""

import os

import torch
import torch.distributed as dist

from molkernels.posttrain import JointTrainer, METHODS
from molkernels.posttrain.synthetic import make_data

STEPS = 20
SFT, PREF = make_data(24, 24, seed=7)
# Responses of very different lengths, so that token-weighting across ranks and micro-batches matters.
SFT = [{"prompt": r["prompt"], "completion": r["completion"] * (1 + (i * 5) % 4)} for i, r in enumerate(SFT)]


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 258, width: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(torch.tanh(h))


def train(method: str, batch_size: int, *, ddp: bool = False) -> torch.Tensor:
    torch.manual_seed(0)
    model = TinyLM()
    policy = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    trainer = JointTrainer(policy, torch.optim.SGD(policy.parameters(), lr=0.5), SFT, PREF, method=method,
                           batch_size=batch_size, grad_accum=2, total_steps=STEPS, max_eval_steps=3, lam=0.4,
                           progress=False)
    trainer.train(STEPS)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), [r["trained"] for r in trainer.history]


def main(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for method in METHODS:
        for ddp in (False, True):
            results[(method, ddp)] = train(method, 2, ddp=ddp)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
