"""JointTrainer across ranks: gloo worlds of 2 and 3 CPU processes with batch_size 2 train as one
process with batch_size 2·ranks (the same global batches), every method, after 20 steps, with a
plain, a DDP-wrapped and an FSDP2 (fully_shard) policy. The FSDP2 runs also check what they sent
(one reduce-scatter per FSDP unit and gradient, so neither grad_accum's micro-batches nor MAXRIGHT's
evaluation forwards reduce; no all_reduce of gradients on top), a checkpoint resumed from every
rank's state, and the FSDP inputs that JointTrainer refuses."""

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


def _run_world(world):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.start_processes(joint_ranks_cases.main, args=(world, os.path.join(tmp, "init"), out), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out, weights_only=False)


@pytest.fixture
def one_thread():
    """The one-process runs on one thread, as the ranks run: this tiny model's ops are far slower
    on several threads competing for a loaded machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_as_one_process_with_their_global_batch(world, one_thread):
    ranks = _run_world(world)
    wrappings = [w for w in joint_ranks_cases.WRAPPINGS if w != "fsdp2" or ranks["fsdp2"]]
    for method in joint_ranks_cases.METHODS:
        expected, trained, _ = joint_ranks_cases.train(method, 2 * world)
        for wrapping in wrappings:
            got, got_trained, sent = ranks[(method, wrapping)]
            assert got_trained == trained, (method, wrapping)
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (method, wrapping, (got - expected).abs().max())
            if wrapping == "fsdp2":
                # FSDP2 reduces each gradient once per step (mgda and moco: one per objective), never
                # per micro-batch nor for an evaluation forward; the trainer adds no all_reduce of
                # gradients (only losses, token counts and the 2×2 Gram: at most 4 numbers).
                per_step = 2 if method in ("mgda", "moco") else 1
                assert sent["reduce_scatters"] == joint_ranks_cases.STEPS * joint_ranks_cases.FSDP_UNITS * per_step, \
                    (method, sent)
                assert sent["largest_all_reduce"] <= 4, (method, sent)
    if not ranks["fsdp2"]:
        pytest.skip(joint_ranks_cases.fsdp2_unavailable_reason())
    if world == 2:
        for method, resumed in ranks["resume"].items():
            assert resumed["difference"] <= 1e-6, (method, resumed)
            assert resumed["plain_state"].startswith("TypeError: state['policy']['embed.weight']: a plain tensor"), \
                (method, resumed)
        refusals = dict(ranks["refusals"])
        assert refusals["reference=None"].startswith("ValueError: reference:"), refusals
        assert refusals["fully_shard on a submodule only"].startswith("ValueError: policy:"), refusals
        assert refusals["a process_group other than the mesh's"].startswith("ValueError: process_group:"), refusals


def test_fsdp1_policy_is_refused():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError as error:
        pytest.skip(f"no FSDP1 in this torch build: {error}")
    # FSDP1 cannot be built on CPU (it needs an accelerator): an instance that is not initialised
    # as FSDP, holding the model, is enough for the check, which comes before anything else reads it.
    policy = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(policy)
    policy._modules["_fsdp_wrapped_module"] = joint_ranks_cases.TinyLM()
    model = joint_ranks_cases.TinyLM()
    with pytest.raises(ValueError, match=r"policy: wrapped in FSDP1 .*fully_shard"):
        joint_ranks_cases.JointTrainer(policy, torch.optim.SGD(model.parameters(), lr=0.1), joint_ranks_cases.SFT,
                                       joint_ranks_cases.PREF, progress=False)


def test_process_group_without_torch_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("this process has a default group")
    model = joint_ranks_cases.TinyLM()
    with pytest.raises(ValueError, match="process_group"):
        joint_ranks_cases.JointTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), joint_ranks_cases.SFT,
                                       joint_ranks_cases.PREF, process_group=object(), progress=False)
