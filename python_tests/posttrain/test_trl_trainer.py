"""JointDPOTrainer inside TRL: every method trains a tiny config-built Llama offline; the losses
equal TRL's on the same batch; ALRIGHT follows the shared schedule; mix is one step of
(1−λ)·f_SFT + λ·f_DPO; the SFT loss is a token mean over accumulated micro-batches; conversational
records train the assistant turns only; resume equals an uninterrupted run; bad options are named."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from molkernels.posttrain import JointDPOTrainer, MethodSchedule  # noqa: E402
from molkernels.posttrain.synthetic import make_data, tiny_bpe_tokenizer, tiny_llama  # noqa: E402

SFT, PREF = make_data(24, 24, seed=1)
TOKENIZER = tiny_bpe_tokenizer([r["prompt"] + r["completion"] for r in SFT] + [r["chosen"] for r in PREF])
MODEL = tiny_llama(0, hidden_size=32, layers=1, heads=2, tokenizer=TOKENIZER)


def config(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                    logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True, max_length=64,
                    disable_tqdm=True, dataset_num_proc=None, bf16=False)
    return DPOConfig(**{**defaults, **kwargs})


def trainer(tmp_path, method="alright", *, sft=SFT, args=None, **kwargs):
    return JointDPOTrainer(copy.deepcopy(MODEL), ref_model=copy.deepcopy(MODEL), args=args or config(tmp_path),
                           train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER,
                           sft_dataset=sft, method=method, **kwargs)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def steps(t):
    return [h for h in t.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("method", ["sequential", "mix", "alright", "maxright", "mgda", "moco"])
def test_every_method_trains(tmp_path, method):
    t = trainer(tmp_path, method, lam=0.5)
    before = flat(t.model)
    t.train()
    logged = steps(t)
    assert len(logged) == 4 and not torch.equal(before, flat(t.model))
    for h in logged:
        trained = ("sft", "dpo") if h["objective"] == "both" else (h["objective"],)
        for o in trained:
            assert h[f"{o}_loss"] == h[f"{o}_loss"] and h[f"{o}_loss"] > 0
        assert h["dpo_trained"] == float("dpo" in trained)
        if method in ("mgda", "moco"):
            assert len(h["weights"]) == 2 and abs(sum(h["weights"]) - 1) < 1e-5
    if method == "sequential":
        assert [h["objective"] for h in logged] == ["sft", "sft", "dpo", "dpo"]


def test_alright_follows_the_shared_schedule(tmp_path):
    t = trainer(tmp_path, "alright", lam=0.3, args=config(tmp_path, max_steps=12))
    t.train()
    twin = MethodSchedule("alright", 0.3, seed=0)
    assert [h["objective"] for h in steps(t)] == [next(iter(twin.weights(s))) for s in range(12)]


def test_losses_equal_trls_on_the_same_batch(tmp_path):
    for loss_type in ("sigmoid", "hinge", "ipo"):
        args = config(tmp_path, loss_type=[loss_type], beta=0.3)
        policy = copy.deepcopy(MODEL)
        with torch.no_grad():  # a policy away from the reference, so the log-ratios are not zero
            for p in policy.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ours = JointDPOTrainer(policy, ref_model=copy.deepcopy(MODEL), args=args,
                               train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER,
                               sft_dataset=SFT, method="mix")
        theirs = DPOTrainer(policy, ref_model=copy.deepcopy(MODEL), args=args,
                            train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER)
        batch = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
        with torch.no_grad():
            expected = theirs.compute_loss(policy, batch)
            got = ours.dpo_objective(policy, batch)
        assert got.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert abs(got.loss.item() - {"sigmoid": 0.6931, "hinge": 1.0, "ipo": 1 / 0.6 ** 2}[loss_type]) > 1e-4  # moved
        if loss_type == "ipo":  # the paper's form (ipo_length_normalize=False) is another number
            ours.ipo_length_normalize = False
            with torch.no_grad():
                paper = ours.dpo_objective(policy, batch).loss
            assert abs(paper.item() - expected.item()) > 1e-3 * expected.item()
    # SFT: molkernels' token mean equals transformers' causal-LM loss on the same batch.
    sft_batch = ours._sft_batch()
    with torch.no_grad():
        hf = policy(**sft_batch).loss
        assert ours.sft_objective(policy, sft_batch).item() == pytest.approx(hf.item(), rel=1e-5)


def test_mix_is_one_step_of_the_weighted_sum(tmp_path):
    args = config(tmp_path, max_steps=1, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
                  max_grad_norm=0.0, weight_decay=0.0)
    t = trainer(tmp_path, "mix", lam=0.3, args=args)
    seen = {}
    sft_batch, dpo_objective = t._sft_batch, t.dpo_objective
    t._sft_stream.position = 0

    def spy_sft():
        seen["sft"] = sft_batch()
        return seen["sft"]

    def spy_dpo(model, inputs):
        seen["dpo"] = {k: v.clone() for k, v in inputs.items()}
        return dpo_objective(model, inputs)

    t._sft_batch, t.dpo_objective = spy_sft, spy_dpo
    start = copy.deepcopy(MODEL)  # the trainer's initial weights (a copy of the trainer's own model would share its
    t.train()                     # forward once accelerate has wrapped it)
    loss = 0.7 * t.sft_objective(start, seen["sft"]) + 0.3 * dpo_objective(start, seen["dpo"]).loss
    grads = torch.autograd.grad(loss, list(start.parameters()))
    expected = torch.cat([(p - 0.5 * g).detach().reshape(-1) for p, g in zip(start.parameters(), grads)])
    assert torch.allclose(flat(t.model), expected, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_takes_the_token_mean(tmp_path):
    uneven = [{"prompt": f"q{i}:", "completion": "ab " * (1 + (i * 7) % 9)} for i in range(16)]

    def run(batch, accumulation):
        args = config(tmp_path, max_steps=1, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                      optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)
        t = trainer(tmp_path, "sequential", lam=0.0, sft=uneven, args=args)
        t.train()
        return t

    whole, accumulated = run(4, 1), run(2, 2)
    assert steps(accumulated)[0]["sft_loss"] == pytest.approx(steps(whole)[0]["sft_loss"], rel=1e-5)
    assert torch.allclose(flat(accumulated.model), flat(whole.model), rtol=1e-5, atol=1e-7)


def test_conversational_records_train_the_assistant_turns_only(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "translate: sun"}, {"role": "assistant", "content": "abc"},
                          {"role": "user", "content": "and moon"}, {"role": "assistant", "content": "def"}]},
            {"prompt": [{"role": "user", "content": "translate: sky"}],
             "completion": [{"role": "assistant", "content": "ghi"}]}] * 4
    t = trainer(tmp_path, "sequential", lam=0.0, sft=chat, args=config(tmp_path, max_length=512))
    for (ids, mask), text in zip(t._sft_records[:2], ("abc</s>\ndef</s>\n", "ghi</s>\n")):
        assert TOKENIZER.decode([i for i, m in zip(ids, mask) if m]) == text
        assert TOKENIZER.decode(ids).startswith("<|user|>\ntranslate")
    t.train()
    assert all(h["sft_loss"] > 0 for h in steps(t))


@pytest.mark.parametrize("method", ["alright", "maxright", "moco"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, method):
    full = trainer(tmp_path, method, lam=0.5, max_eval_steps=2,
                   args=config(tmp_path / "a", max_steps=6, save_strategy="steps", save_steps=3))
    full.train()
    resumed = trainer(tmp_path, method, lam=0.5, max_eval_steps=2,
                      args=config(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert torch.allclose(flat(resumed.model), flat(full.model), rtol=1e-6, atol=1e-7)
    assert [h["objective"] for h in steps(resumed)][-3:] == [h["objective"] for h in steps(full)][-3:]


def test_bad_options_are_named(tmp_path):
    cases = [
        (dict(method="adam"), "method"),
        (dict(sft_dataset=None), "sft_dataset"),
        (dict(method="sequential", args=config(tmp_path, max_steps=-1, num_train_epochs=1)), "total_steps"),
        (dict(args=config(tmp_path, loss_type=["robust"])), "args.loss_type"),
        (dict(ipo_length_normalize=1), "ipo_length_normalize"),
        (dict(args=config(tmp_path, loss_type=["sigmoid", "hinge"])), "args.loss_type"),
        (dict(args=config(tmp_path, label_smoothing=0.1)), "args.label_smoothing"),
        (dict(normalize="l2"), "normalize"),
        (dict(sft_dataset=[{"prompt": "a"}]), r"sft_dataset: record 0"),
        (dict(sft_dataset=[{"prompt": "a", "completion": 3}]), r"sft_dataset: record 0"),
    ]
    for kwargs, match in cases:
        kwargs = {"method": "alright", "sft_dataset": SFT, "args": config(tmp_path), **kwargs}
        with pytest.raises(ValueError, match=match):
            JointDPOTrainer(copy.deepcopy(MODEL), ref_model=copy.deepcopy(MODEL),
                            train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER, **kwargs)
    t = trainer(tmp_path, "alright")
    plain = tmp_path / "plain-checkpoint"
    DPOTrainer(copy.deepcopy(MODEL), ref_model=copy.deepcopy(MODEL), args=config(plain, max_steps=1, save_strategy="steps",
                                                                                  save_steps=1),
               train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER).train()
    with pytest.raises(ValueError, match="molkernels_joint_state"):
        t.train(resume_from_checkpoint=str(plain / "checkpoint-1"))


@pytest.mark.parametrize("ranks, methods", [(2, ["sequential", "mix", "alright", "maxright", "mgda", "moco"]),
                                             (3, ["alright", "moco"])])
def test_ranks_under_torchrun_equal_one_rank_with_the_same_global_batch(tmp_path, ranks, methods):
    """gloo on CPU: per-rank batch 2 on 2 ranks (every method) or 3 ranks (a scheduled method and a
    fused one) against batch 2 * ranks on one process, SFT responses of uneven lengths, 5 steps."""
    import socket
    import subprocess
    import sys

    world = os.path.join(os.path.dirname(__file__), "trl_world.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, command in ((tmp_path / "one", [sys.executable, world, str(tmp_path / "one"), str(2 * ranks), *methods]),
                         (tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                             str(ranks), f"--master-port={port}", world, str(tmp_path / "two"), "2",
                                             *methods])):
        out.mkdir()
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "results.pt", weights_only=True) for name in ("one", "two"))
    for method in methods:
        assert two[method]["objectives"] == one[method]["objectives"], method
        assert torch.allclose(two[method]["params"], one[method]["params"], rtol=1e-5, atol=1e-6), method
        for a, b in zip(one[method]["losses"], two[method]["losses"]):  # [sft, dpo], None where not trained
            assert [x is None for x in a] == [x is None for x in b]
            assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], rel=1e-5)


def test_peft_lora_with_the_adapters_disabled_as_the_reference(tmp_path):
    from peft import LoraConfig

    t = JointDPOTrainer(copy.deepcopy(MODEL), ref_model=None, args=config(tmp_path, max_steps=3),
                        train_dataset=datasets.Dataset.from_list(PREF), processing_class=TOKENIZER, sft_dataset=SFT,
                        method="mix", peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    t.train()
    first = steps(t)[0]
    assert first["dpo_loss"] == pytest.approx(0.693147, abs=1e-5)  # LoRA starts at zero: the policy is the reference
    assert all(torch.equal(p, frozen[n]) for n, p in t.model.named_parameters() if not p.requires_grad)
    assert steps(t)[-1]["dpo_loss"] != pytest.approx(0.693147, abs=1e-6)


def test_precomputed_reference_log_probs_give_the_same_run(tmp_path):
    runs = []
    for precompute in (False, True):
        t = trainer(tmp_path / str(precompute), "mix",
                    args=config(tmp_path / str(precompute), max_steps=3, precompute_ref_log_probs=precompute))
        t.train()
        runs.append(steps(t))
    for a, b in zip(*runs):
        assert b["dpo_loss"] == pytest.approx(a["dpo_loss"], rel=1e-5)


def test_conversational_preference_records_go_through_trls_chat_template(tmp_path):
    chat_pref = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PREF]
    t = JointDPOTrainer(copy.deepcopy(MODEL), ref_model=copy.deepcopy(MODEL),
                        args=config(tmp_path, max_steps=2, max_length=512),
                        train_dataset=datasets.Dataset.from_list(chat_pref), processing_class=TOKENIZER,
                        sft_dataset=SFT, method="mix")
    t.train()
    assert all(h["dpo_loss"] == h["dpo_loss"] and h["objective"] == "both" for h in steps(t))
