"""JointTrainer across ranks: gloo worlds of 2 and 3 CPU processes with batch_size 2 train as one
process with batch_size 2·ranks (the same global batches), every method, after 20 steps, with a
plain and a DDP-wrapped policy."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import joint_ranks_cases  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this torch build")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_as_one_process_with_their_global_batch(world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.start_processes(joint_ranks_cases.main, args=(world, os.path.join(tmp, "init"), out), nprocs=world,
                           join=True, start_method="spawn")
        ranks = torch.load(out, weights_only=False)
    for method in joint_ranks_cases.METHODS:
        expected, trained = joint_ranks_cases.train(method, 2 * world)
        for ddp in (False, True):
            got, got_trained = ranks[(method, ddp)]
            assert got_trained == trained, (method, ddp)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (method, ddp, (got - expected).abs().max())


def test_process_group_without_torch_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("this process has a default group")
    model = joint_ranks_cases.TinyLM()
    with pytest.raises(ValueError, match="process_group"):
        joint_ranks_cases.JointTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), joint_ranks_cases.SFT,
                                       joint_ranks_cases.PREF, process_group=object(), progress=False)
