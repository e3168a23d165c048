"""JointTrainer: each method's step logic, the fused K = 2 steps of mgda/moco, reference models,
gradient accumulation, resume equality, end-to-end runs on a tiny Llama, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import molkernels
from molkernels import reference as ref
from molkernels.posttrain import (ByteTokenizer, JointTrainer, PreferenceDataset, precompute_reference_logps, response_tokens,
                                  trainer as trainer_module)
from molkernels.posttrain.synthetic import make_data, tiny_llama

SFT, PREF = make_data(24, 24, seed=11)


class TinyLM(torch.nn.Module):
    """Token embedding, a causal running mean, and a linear read-out: fast, deterministic, and
    every parameter gets a gradient from both objectives."""

    def __init__(self, vocab: int = 258, width: int = 8, seed: int = 0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.out = torch.nn.Linear(width, vocab)
        self.to(dtype)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(torch.tanh(h))


def make_trainer(method="alright", *, model=None, lr=1e-2, optimizer=torch.optim.Adam, **kwargs):
    model = TinyLM() if model is None else model
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("total_steps", 10)
    return JointTrainer(model, optimizer(model.parameters(), lr=lr), SFT, PREF, method=method, progress=False,
                        **kwargs)


def test_alright_draws_dpo_with_probability_lam():
    for lam in (0.25, 0.8):
        trainer = make_trainer("alright", lam=lam, seed=3)
        draws = [trainer.schedule.weights(0) for _ in range(4000)]
        assert all(w in ({"dpo": 1.0}, {"sft": 1.0}) for w in draws)
        frequency = sum("dpo" in w for w in draws) / len(draws)
        assert abs(frequency - lam) < 0.025, (lam, frequency)   # ~3.5 standard deviations
    # Training steps follow the same draws: one objective per step, DPO with probability λ.
    trainer, twin = make_trainer("alright", lam=0.5, seed=4), make_trainer("alright", lam=0.5, seed=4)
    records = trainer.train(12)
    assert [r["trained"] for r in records] == [sorted(twin.schedule.weights(t)) for t in range(12)]
    assert {tuple(r["trained"]) for r in records} == {("sft",), ("dpo",)}


def test_sequential_splits_the_budget_by_lam():
    trainer = make_trainer("sequential", lam=0.3, total_steps=10)
    trainer.train(12)
    assert [r["trained"] for r in trainer.history] == [["sft"]] * 7 + [["dpo"]] * 5


def test_maxright_trains_the_larger_weighted_gap_and_refreshes_on_schedule(monkeypatch):
    trainer = make_trainer("maxright", lam=0.9, sft_opt=0.5, dpo_opt=0.1, max_eval_steps=3)
    evaluations = []
    original = trainer.objective

    def spy(name, batch, **kwargs):
        evaluations.append((trainer.step_count, name, torch.is_grad_enabled()))
        return original(name, batch, **kwargs)

    monkeypatch.setattr(trainer, "objective", spy)
    for _ in range(9):
        gaps_before = dict(trainer.schedule.gaps)
        record = trainer.step()
        refreshed = record.get("refreshed", False)
        assert refreshed == (record["step"] % 3 == 0)
        no_grad = [n for s, n, grad in evaluations if s == record["step"] and not grad]
        assert sorted(no_grad) == (["dpo", "sft"] if refreshed else [])
        if not refreshed:
            expected = max(("sft", "dpo"), key=lambda o: gaps_before[o])
            assert record["trained"] == [expected]
        trained = record["trained"][0]
        # The trained objective's gap comes from the loss just computed, weighted by (1 − λ) or λ.
        weight, optimum = (0.1, 0.5) if trained == "sft" else (0.9, 0.1)
        assert record[f"{trained}_gap"] == pytest.approx(weight * (record[f"{trained}_loss"] - optimum))
    assert {tuple(r["trained"]) for r in trainer.history} == {("sft",), ("dpo",)}


def _flat_params(trainer):
    """A copy of the trained parameters as one vector."""
    return torch.cat([p.detach().reshape(-1) for p in trainer.params])


def _objective_grads(trainer, batches):
    grads = []
    for name in ("sft", "dpo"):
        loss = trainer.objective(name, batches[name])
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainer.params)]))
    return torch.stack(grads)


def _peek_batches(trainer):
    saved = {o: s.position for o, s in trainer.streams.items()}
    batches = {o: trainer._batch(o) for o in ("sft", "dpo")}
    for o, position in saved.items():
        trainer.streams[o].position = position
    return batches


@pytest.mark.parametrize("method", ["mix", "mgda"])
def test_mix_and_mgda_directions(method):
    trainer = make_trainer(method, lam=0.3, optimizer=torch.optim.SGD, lr=1.0)
    G = _objective_grads(trainer, _peek_batches(trainer)).double()
    before = _flat_params(trainer)
    trainer.step()
    after = _flat_params(trainer)
    if method == "mix":
        direction = 0.7 * G[0] + 0.3 * G[1]
    else:
        lam = ref.min_norm(G @ G.T)
        direction = lam @ G
        assert trainer.history[-1]["weights"] == pytest.approx(lam.tolist(), abs=1e-5)
    assert torch.allclose((before - after).double(), direction, rtol=1e-4, atol=1e-6)


def test_normalized_mgda_direction():
    trainer = make_trainer("mgda", normalize="l2", optimizer=torch.optim.SGD, lr=1.0)
    G = _objective_grads(trainer, _peek_batches(trainer)).double()
    unit = G / G.norm(dim=1, keepdim=True)
    lam = ref.min_norm(unit @ unit.T)
    before = _flat_params(trainer)
    trainer.step()
    after = _flat_params(trainer)
    assert trainer.history[-1]["weights"] == pytest.approx(lam.tolist(), abs=1e-5)
    assert torch.allclose((before - after).double(), lam @ unit, rtol=1e-4, atol=1e-6)


def test_mgda_and_moco_call_the_fused_steps_with_two_objectives(monkeypatch):
    calls = []
    for name in ("mgda_step", "moco_step"):
        original = getattr(trainer_module, name)

        def spy(params, grads, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, tuple(grads.shape)))
            return _original(params, grads, *args, **kwargs)

        monkeypatch.setattr(trainer_module, name, spy)
    for method in ("mgda", "moco"):
        trainer = make_trainer(method)
        trainer.train(2)
    D = sum(p.numel() for p in TinyLM().parameters())
    assert calls == [("mgda_step", (2, D))] * 2 + [("moco_step", (2, D))] * 2


def test_moco_tracks_the_gradients():
    trainer = make_trainer("moco", moco_beta=0.5, moco_gamma=0.1, optimizer=torch.optim.SGD, lr=1.0)
    G = _objective_grads(trainer, _peek_batches(trainer)).double()
    before = _flat_params(trainer)
    trainer.step()
    Y = 0.5 * G                                        # Y starts at 0: Y ← Y − β(Y − G)
    lam = ref.project_simplex(torch.full((2,), 0.5, dtype=torch.float64) - 0.1 * (Y @ Y.T) @ torch.full((2,), 0.5, dtype=torch.float64))
    after = _flat_params(trainer)
    assert torch.allclose((before - after).double(), lam @ Y, rtol=1e-4, atol=1e-6)
    assert torch.allclose(trainer.moco_state.y_flat.double(), Y, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_takes_the_token_mean_of_all_micro_batches():
    trainer = make_trainer("sequential", lam=0.0, grad_accum=3, optimizer=torch.optim.SGD, lr=1.0)
    batches = [trainer._batch("sft") for _ in range(3)]
    tokens = sum(int(response_tokens(b["labels"])) for b in batches)
    expected = torch.zeros_like(_flat_params(trainer))
    for batch in batches:
        loss = trainer.objective("sft", batch, num_items=tokens)
        expected += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainer.params)])
    trainer.streams["sft"].position = 0
    before = _flat_params(trainer)
    record = trainer.step()
    after = _flat_params(trainer)
    assert trainer.streams["sft"].position == 12
    assert torch.allclose(before - after, expected, rtol=1e-5, atol=1e-6)  # p − g rounds at ulp(p)
    assert record["sft_loss"] > 0


# Responses of 1 to 40 characters, so that micro-batches hold very different numbers of tokens.
UNEVEN_SFT = [{"prompt": f"q{i}:", "completion": "ab" * (1 + (i * 7) % 20)} for i in range(16)]


@pytest.mark.parametrize("method", ["mix", "mgda"])
def test_uneven_micro_batches_equal_one_batch_of_all_their_tokens(method):
    def trainer_for(batch_size, grad_accum):
        model = TinyLM(dtype=torch.float64)
        return JointTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), UNEVEN_SFT, PREF, method=method,
                            lam=0.3, batch_size=batch_size, grad_accum=grad_accum, progress=False)

    # The two micro-batches hold different numbers of tokens, so the mean of their means (what
    # averaging micro-batch losses gives) is not the token mean: the test can fail.
    probe = trainer_for(2, 2)
    micro = [probe._batch("sft") for _ in range(2)]
    tokens = [int(response_tokens(b["labels"])) for b in micro]
    with torch.no_grad():
        mean_of_means = sum(probe.objective("sft", b).item() for b in micro) / 2

    whole, accumulated = trainer_for(4, 1), trainer_for(2, 2)
    whole_record, accumulated_record = whole.step(), accumulated.step()
    assert tokens[0] != tokens[1]
    assert abs(mean_of_means - whole_record["sft_loss"]) > 1e-3 * whole_record["sft_loss"]
    assert accumulated_record["sft_loss"] == pytest.approx(whole_record["sft_loss"], rel=1e-12)
    assert accumulated_record["dpo_loss"] == pytest.approx(whole_record["dpo_loss"], rel=1e-12)
    assert torch.allclose(_flat_params(accumulated), _flat_params(whole), rtol=1e-10, atol=1e-12)


def test_sft_num_items_is_checked():
    trainer = make_trainer()
    batch = trainer._batch("sft")
    for bad in (0, -3, float("nan"), "12", True):
        with pytest.raises(ValueError, match="num_items"):
            trainer.objective("sft", batch, num_items=bad)
    with pytest.raises(ValueError, match="num_items"):
        trainer.objective("dpo", trainer._batch("dpo"), num_items=10)


def test_mgda_with_gradient_accumulation_uses_the_whole_batch_gradients():
    trainer = make_trainer("mgda", grad_accum=2, optimizer=torch.optim.SGD, lr=1.0)
    saved = {o: s.position for o, s in trainer.streams.items()}
    batches = [{o: trainer._batch(o) for o in ("sft", "dpo")} for _ in range(2)]
    for o, position in saved.items():
        trainer.streams[o].position = position
    tokens = sum(int(response_tokens(b["sft"]["labels"])) for b in batches)
    G = torch.zeros(2, _flat_params(trainer).numel(), dtype=torch.float64)
    for b in batches:  # the SFT row: the token mean over both micro-batches; the DPO row: the mean
        sft = trainer.objective("sft", b["sft"], num_items=tokens)
        dpo = trainer.objective("dpo", b["dpo"]) / 2
        for row, loss in enumerate((sft, dpo)):
            G[row] += torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainer.params)]).double()
    lam = ref.min_norm(G @ G.T)
    before = _flat_params(trainer)
    trainer.step()
    after = _flat_params(trainer)
    assert trainer.history[-1]["weights"] == pytest.approx(lam.tolist(), abs=1e-5)
    assert torch.allclose((before - after).double(), lam @ G, rtol=1e-4, atol=1e-6)


def test_reference_variants_agree():
    model = TinyLM(seed=4)
    frozen = make_trainer("sequential", model=copy.deepcopy(model), lam=1.0)
    explicit = make_trainer("sequential", model=copy.deepcopy(model), lam=1.0, reference=copy.deepcopy(model))
    data = PreferenceDataset(PREF, ByteTokenizer())
    precompute_reference_logps(model, data, batch_size=5)
    assert data.reference_logps.shape == (len(PREF), 2)
    policy = copy.deepcopy(model)
    precomputed = JointTrainer(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), SFT, data, method="sequential",
                               lam=1.0, total_steps=10, batch_size=4, progress=False)
    assert precomputed.reference == "precomputed"
    with pytest.raises(ValueError, match="pref_data: this trainer's reference is precomputed"):
        precomputed.evaluate(frozen.sft_data, PreferenceDataset(PREF[:4], ByteTokenizer()))
    runs = [t.train(3) for t in (frozen, explicit, precomputed)]
    for other in runs[1:]:
        assert [r["dpo_loss"] for r in other] == pytest.approx([r["dpo_loss"] for r in runs[0]], rel=1e-5)
    assert runs[0][0]["dpo_loss"] == pytest.approx(0.6931472, rel=1e-6)  # the policy starts at the reference


def test_peft_reference_is_the_policy_without_adapters():
    peft = pytest.importorskip("peft")
    base = tiny_llama(0, hidden_size=16, layers=1, heads=2)
    policy = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    trainer = JointTrainer(policy, torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2),
                           SFT, PREF, reference="adapters", method="alright", lam=1.0, batch_size=2, progress=False)
    assert len(trainer.params) == 4   # only the LoRA matrices train
    batch = trainer._batch("dpo")
    chosen, rejected = trainer._reference_logps(batch)
    with policy.disable_adapter(), torch.no_grad():
        plain = trainer_module.sequence_logps(policy(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).logits, batch["labels"])
        adapted = trainer_module.sequence_logps(base(input_ids=batch["input_ids"],
                                                     attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert torch.equal(torch.cat([chosen, rejected]), plain)
    assert torch.equal(adapted, plain)   # disable_adapter really is the base model
    records = trainer.train(2)
    assert all(r["dpo_loss"] == r["dpo_loss"] for r in records)


@pytest.mark.parametrize("method", ["sequential", "mix", "alright", "maxright", "mgda", "moco"])
def test_resume_continues_identically(method):
    kwargs = dict(lam=0.5, max_eval_steps=2, seed=5, total_steps=6)
    straight = make_trainer(method, **kwargs)
    straight.train(6)
    first = make_trainer(method, **kwargs)
    first.train(3)
    state = copy.deepcopy(first.state_dict())
    first.train(2)   # diverge after saving: the checkpoint must not alias live state
    resumed = make_trainer(method, model=TinyLM(seed=99), **kwargs)
    resumed.load_state_dict(state)
    resumed.train(3)
    for a, b in zip(straight.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(a, b)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_bytes")} for r in h]  # noqa: E731
    assert strip(straight.history) == strip(resumed.history)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["sequential", "mix", "alright", "maxright", "mgda", "moco"])
def test_every_method_trains_a_tiny_llama(method, dtype):
    model = tiny_llama(1, hidden_size=16, layers=1, heads=2, dtype=dtype)
    trainer = make_trainer(method, model=model, lr=3e-3, total_steps=4, backend="cpu")
    records = trainer.train(4)
    for r in records:
        for key in ("sft_loss", "dpo_loss"):
            if key in r:
                assert r[key] == r[key] and r[key] >= 0
        assert r["seconds"] > 0 and r["peak_mem_bytes"] > 0
    sft_eval, pref_eval = trainer.sft_data, trainer.pref_data
    metrics = trainer.evaluate(sft_eval, pref_eval, batch_size=7)
    assert set(metrics) == {"sft_loss", "dpo_loss"} and all(v == v for v in metrics.values())


def test_bfloat16_policy_with_the_fused_steps():
    model = TinyLM(dtype=torch.bfloat16)
    for method in ("mgda", "moco"):
        trainer = make_trainer(method, model=copy.deepcopy(model))
        assert trainer.grads_flat.dtype == torch.bfloat16
        records = trainer.train(2)
        assert all(r["sft_loss"] == r["sft_loss"] and len(r["weights"]) == 2 for r in records)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lam=1.5), "lam: expected a finite number in \\[0.0, 1.0\\]"),
    (dict(lam=-0.1), "lam"),
    (dict(lam=float("nan")), "lam"),
    (dict(method="dpo"), "method: expected one of"),
    (dict(method="sequential", total_steps=None), "total_steps"),
    (dict(beta=0.0), "beta"),
    (dict(max_eval_steps=0), "max_eval_steps"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(batch_size=0), "batch_size"),
    (dict(reference="adapters"), "reference: 'adapters' needs a PEFT policy"),
    (dict(reference="precomputed"), "reference: 'precomputed' needs"),
    (dict(reference="frozen"), "reference: expected None, a module"),
    (dict(loss_type="kto"), "loss_type"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(method="mgda", normalize="max"), "normalize: expected one of"),
    (dict(method="mix", normalize="l2"), "normalize: applies to the mgda and moco methods, not 'mix'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**{"method": "alright", **kwargs})


def test_bad_data():
    model = TinyLM()
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="sft_data: no records"):
        JointTrainer(model, optimizer, [], PREF)
    with pytest.raises(ValueError, match="pref_data: record 2 is missing the field 'chosen'"):
        JointTrainer(model, optimizer, SFT, PREF[:2] + [{"prompt": "p", "rejected": "r"}])
    frozen = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="policy: has no parameters with requires_grad"):
        JointTrainer(frozen, optimizer, SFT, PREF)


@pytest.mark.parametrize("method", ["mix", "moco"])
def test_a_non_finite_loss_stops_before_any_update(method):
    trainer = make_trainer(method)
    trainer.train(1)
    with torch.no_grad():
        trainer.policy.out.bias[7] = float("nan")
    params = [p.detach().clone() for p in trainer.params]
    optimizer_state = copy.deepcopy(trainer.optimizer.state_dict())
    tracked = trainer.moco_state.y_flat.clone() if method == "moco" else None
    with pytest.raises(FloatingPointError, match="step 1: the SFT loss is nan"):
        trainer.step()
    for p, q in zip(trainer.params, params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(trainer.optimizer.state_dict()["state"], optimizer_state["state"], rtol=0, atol=0)
    assert trainer.step_count == 1
    if method == "moco":
        assert torch.equal(trainer.moco_state.y_flat, tracked) and trainer.moco_state.step == 1


def test_load_state_dict_refuses_another_method():
    state = make_trainer("mix").state_dict()
    with pytest.raises(ValueError, match="saved by method 'mix'"):
        make_trainer("alright").load_state_dict(state)


def test_mgda_backend_choice_is_forwarded():
    trainer = make_trainer("mgda", backend="reference")
    trainer.train(1)
    with pytest.raises(ValueError, match="backend"):
        make_trainer("mgda", backend="nope").train(1)
    assert "cpu" in molkernels.backends()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["alright", "mgda", "moco"])
def test_cuda_policy(method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible (torch.cuda.is_available() is False)")
    cpu = make_trainer(method, model=TinyLM(seed=2))
    gpu = make_trainer(method, model=TinyLM(seed=2).cuda())
    cpu_records, gpu_records = cpu.train(3), gpu.train(3)
    for a, b in zip(cpu_records, gpu_records):
        assert a["trained"] == b["trained"]
        for key in ("sft_loss", "dpo_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3)
        assert 0 < b["peak_mem_bytes"] < 1 << 30      # the CUDA allocator's peak, not the process's RSS
    for p, q in zip(cpu.policy.parameters(), gpu.policy.parameters()):
        assert torch.allclose(p, q.cpu(), rtol=1e-3, atol=1e-4)
