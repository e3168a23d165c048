"""SFT and DPO losses against hand-computed values and an independent per-element implementation
of the formulas (python floats, explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch

from molkernels.posttrain import dpo_loss, sequence_logps, sft_loss


def _log_softmax_row(row):
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


def _token_terms(logits, labels, ignore=-100):
    """(sequence index, log p) of every response token, by explicit loops."""
    terms = []
    for b in range(len(labels)):
        for t in range(len(labels[b]) - 1):
            target = labels[b][t + 1]
            if target != ignore:
                terms.append((b, _log_softmax_row(logits[b][t])[target]))
    return terms


def test_sft_loss_by_hand():
    # One sequence, vocabulary 2, logits giving p = (0.5, 0.5) then p(token 1) = e / (1 + e).
    logits = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    expected = (math.log(2) + math.log(1 + math.e) - 1) / 2
    assert sft_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert sequence_logps(logits, labels).item() == pytest.approx(-2 * expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_losses_against_loops(dtype):
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 7, 11
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100          # a prompt
    labels[1, 5:] = -100          # padding
    labels[2, :] = -100
    labels[2, 4] = 2              # a single response token
    terms = _token_terms(logits.double().tolist(), labels.tolist())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert sft_loss(logits, labels).item() == pytest.approx(-sum(v for _, v in terms) / len(terms), rel=tol)
    per_sequence = [sum(v for b, v in terms if b == s) for s in range(B)]
    out = sequence_logps(logits, labels)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (B,)
    assert out.tolist() == pytest.approx(per_sequence, rel=tol)


def _plain_token_logps(logits, labels):
    """The textbook formula: log_softmax in float32 on the shifted logits, gathered."""
    targets = labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


@pytest.mark.parametrize("chunk", [1 << 24, 7, 1])   # one chunk; chunks of one row (V = 11 > 7); a row each
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gradients_against_log_softmax(monkeypatch, chunk, dtype):
    from molkernels.posttrain import losses

    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 6, 11
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, 4:] = -100
    weights = torch.randn(B, generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (sequence_logps(a, labels) * weights).sum().backward()
    logp, _ = _plain_token_logps(b, labels)
    (logp.sum(-1) * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert (a.grad[:, -1] == 0).all()                        # the last position predicts nothing
    a.grad = None
    sft_loss(a, labels).backward()
    b.grad = None
    logp, mask = _plain_token_logps(b, labels)
    (-(logp.sum() / mask.sum())).backward()
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


def test_gradcheck_float64():
    from molkernels.posttrain.losses import _TargetLogProbs

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 5, (2, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: _TargetLogProbs.apply(x, targets), (logits,))


def test_sft_loss_ignores_the_first_label_and_padding():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, -100, 2, 3], [4, 0, -100, -100]])
    terms = _token_terms(logits.double().tolist(), labels.tolist())
    assert len(terms) == 3
    assert sft_loss(logits, labels).item() == pytest.approx(-sum(v for _, v in terms) / 3, rel=1e-5)


def _dpo_by_hand(pc, pr, rc, rr, beta, eps, loss_type):
    losses = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        h = (a - b) - (c - d)
        if loss_type == "sigmoid":
            log_sig = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
            losses.append(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h))
        elif loss_type == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(max(0.0, 1 - beta * h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("loss_type,beta,eps", [(t, b, 0.0) for t in ("sigmoid", "ipo", "hinge") for b in (0.1, 0.5, 2.0)]
                         + [("sigmoid", 0.5, 0.2), ("sigmoid", 0.1, 0.45)])  # label smoothing: sigmoid only
def test_dpo_loss_against_formulas(loss_type, beta, eps):
    g = torch.Generator().manual_seed(5)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, loss_type=loss_type)
    expected = _dpo_by_hand(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps, loss_type)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert torch.allclose(out.chosen_rewards, beta * (pc - rc))
    assert torch.allclose(out.rejected_rewards, beta * (pr - rr))
    assert not out.chosen_rewards.requires_grad


def test_dpo_loss_values_by_hand():
    zero = torch.zeros(1)
    assert dpo_loss(zero, zero, zero, zero).loss.item() == pytest.approx(math.log(2))
    assert dpo_loss(zero, zero, zero, zero, loss_type="hinge").loss.item() == pytest.approx(1.0)
    assert dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type="ipo").loss.item() == pytest.approx(1.0)
    # h = 2, β = 1: log(1 + e^-2).
    h = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), zero, zero, beta=1.0).loss.item()
    assert h == pytest.approx(math.log1p(math.exp(-2)), rel=1e-6)


def test_dpo_loss_gradient_flows_to_the_policy_only():
    pc = torch.tensor([-3.0, -2.0], requires_grad=True)
    pr = torch.tensor([-1.0, -4.0], requires_grad=True)
    out = dpo_loss(pc, pr, torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]))
    out.loss.backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # raise chosen, lower rejected


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(label_smoothing=0.5), "label_smoothing"), (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(loss_type="kto"), "loss_type"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing: defined for loss_type='sigmoid' only"),
])
def test_dpo_loss_bad_options(kwargs, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_dpo_loss_chosen_and_rejected_batch_sizes_differ():
    with pytest.raises(ValueError, match="policy_rejected_logps: has batch size 3, policy_chosen_logps has 2"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="ref_chosen_logps: expected a floating"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        dpo_loss(*(torch.zeros(0) for _ in range(4)))


def test_logits_and_labels_checked():
    with pytest.raises(ValueError, match="logits"):
        sft_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels: expected shape \\(2, 3\\)"):
        sequence_logps(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels: expected an integer"):
        sft_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3))


def test_ipo_length_normalisation():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-3.0, -5.0], [-4.0, -2.0], [-3.5, -4.0], [-3.0, -2.5]))
    lengths = (torch.tensor([2, 4]), torch.tensor([1, 5]))
    h = ((pc - rc) / lengths[0] - (pr - rr) / lengths[1])
    out = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo", completion_lengths=lengths)
    assert out.loss.item() == pytest.approx(((h - 2.0) ** 2).mean().item())
    paper = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert paper.loss.item() == pytest.approx((((pc - rc) - (pr - rr) - 2.0) ** 2).mean().item())
    for bad, match in (((lengths[0],), "completion_lengths"), ((lengths[0], torch.tensor([1, 0])), "positive"),
                       ((lengths[0], torch.tensor([1, 2, 3])), r"\[2\] tensor")):
        with pytest.raises(ValueError, match=match):
            dpo_loss(pc, pr, rc, rr, loss_type="ipo", completion_lengths=bad)
    with pytest.raises(ValueError, match="ipo loss only"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmoid", completion_lengths=lengths)
