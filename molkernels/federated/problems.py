"""Client objectives of the open-system simulator, batched over all C client slots.

A problem holds one local objective f_c per slot as [C, ...] tensors, so that the stochastic gradients
of all clients at their current models X [C, D] are one batched torch computation (`grad`), and it
knows the current population's optimum

    x*_t = argmin_x F_t(x),   F_t = Σ_{c active} w_c f_c / Σ_{c active} w_c,

with w_c the client's weight (its local data size n_c, or 1 with uniform weighting). A joining client
draws a fresh objective (`renew`): fresh local data. Every problem has L = 1 (the largest curvature
of any f_c is at most 1), so a learning rate means the same thing on both problems, and the
condition number κ = L/μ is set by the strong convexity μ = 1/κ.

Gradient noise, both problems: the local stochastic gradient is ∇f_c(x) + ξ with ξ ~ N(0, (σ²/D) I),
independent across clients and steps, so that E‖ξ‖² = σ² whatever the dimension D.

QuadraticProblem
    f_c(x) = ½ (x − b_c)ᵀ A_c (x − b_c),  A_c = Q diag(λ_c) Qᵀ.
    Q is one random orthogonal matrix shared by all clients (drawn once per seed; basis="identity"
    makes it I and the gradient elementwise), so every gradient is ((X Q − B̃) ⊙ Λ) Qᵀ for all clients
    at once (B̃ = B Q: the b_c in Q's basis). The spectrum of each client spans [1/κ, 1] exactly:
    λ_{c,i} = κ^{−s_{c,i}} with s_c = (1 − h)·i/(D − 1) + h·u_{c,i} (u uniform), affinely rescaled per
    client to span [0, 1], so min λ_c = 1/κ and max λ_c = 1 (each client has condition number κ);
    h = `curvature_spread` ∈ [0, 1] makes the clients' curvatures differ (0: identical A_c).
    b_c = b̄ + ζ·N(0, I/D): b̄ ~ N(0, I/D) is drawn once per seed, ζ = `heterogeneity`.
    x*_t = (Σ w_c A_c)⁻¹ Σ w_c A_c b_c, in closed form (diagonal in Q's basis), in float64.
    Data sizes n_c (the weights) are uniform integers in [`min_size`, `max_size`].

LogRegProblem
    ℓ2-regularised logistic regression on a dataset bundled with scikit-learn (offline):
    f_c(x) = (1/n_c) Σ_i log(1 + exp(−ỹ_i a_iᵀx)) + (μ/2)‖x‖²  (ỹ ∈ {−1, 1}),
    with features standardised over the whole dataset, a constant bias feature appended, and all
    features scaled so that ¼ λ_max(AᵀA/N) = 1 over the whole dataset (the logistic loss's curvature
    bound; a client's own bound can exceed it a little); μ = 1/(κ − 1) then makes 1 + 1/μ = κ the
    condition number bound of the pooled objective (κ > 1 required; the actual local and population
    condition numbers are at most about κ).
    A joining client draws n_c uniform in [`min_size`, `max_size`] samples, with replacement, from a
    non-iid share of the dataset: its class proportions p_c ~ Dirichlet(α·1) over the dataset's
    original classes (α = `label_skew`; small α: few classes per client), then each sample's class
    from p_c and the sample uniformly within the class. Datasets: "breast_cancer" (2 classes, D = 31)
    and "digits" (the 10 digits, the binary target digit ≥ 5, D = 65).
    Local gradients use all n_c local samples (full batch) unless `batch_size` is set (then
    batch_size samples with replacement per step), plus the additive noise ξ.
    x*_t: Newton's method in float64 on the active clients' pooled data (weights w_c/n_c per sample),
    warm-started at the previous optimum, with backtracking, to ‖∇F_t‖ ≤ 1e-12·max(1, ‖∇F_t(0)‖).
"""

from __future__ import annotations

import inspect
import math
from typing import Dict, Optional, Tuple

import torch

from .._checks import (check_device, check_integer, check_number, check_state_keys, check_state_tensor,
                       check_state_values, state_path)

PROBLEMS = ("quadratic", "logreg")
DATASETS = ("breast_cancer", "digits")
PROBLEM_DTYPES = (torch.float32, torch.float64)


def _noise(shape, sigma: float, generator: torch.Generator, device, dtype) -> Optional[torch.Tensor]:
    if sigma == 0.0:
        return None
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(sigma / math.sqrt(shape[-1]))


def _uniform_ints(low: int, high: int, n: int, generator, device) -> torch.Tensor:
    return torch.randint(low, high + 1, (n,), generator=generator, device=device)


class Problem:
    """The interface the simulator uses. Subclasses hold their per-slot tensors on `device`; the
    ones named in `state_names` are the problem's state (state_dict / load_state_dict)."""

    name = "problem"
    clients: int
    dim: int
    sigma: float
    state_names: Optional[Tuple[str, ...]] = None

    def reset(self, generator: torch.Generator) -> None:
        """Draws the per-seed quantities and a fresh objective for every slot."""
        raise NotImplementedError

    def renew(self, joined: torch.Tensor, generator: torch.Generator) -> None:
        """Fresh objectives for the slots in the bool mask `joined` (one host synchronisation: the
        number of new clients; draws only for them, in slot order)."""
        raise NotImplementedError

    def sizes(self) -> torch.Tensor:
        """[C] local data sizes n_c (float, the problem's dtype)."""
        raise NotImplementedError

    def grad(self, X: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[C, D] stochastic gradients of every slot's objective at its row of X, one batched computation."""
        raise NotImplementedError

    def optimum(self, active: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
        """x*_t [D] in float64 for the active slots and weights; None when no slot is active."""
        raise NotImplementedError

    def objective(self, x: torch.Tensor, active: torch.Tensor, weights: torch.Tensor) -> float:
        """F_t(x) (float64) for the active slots."""
        raise NotImplementedError

    def state_dict(self) -> Dict[str, object]:
        if self.state_names is None:
            raise NotImplementedError(f"{type(self).__name__}: no state_names, so no state_dict")
        return {name: getattr(self, name).clone() for name in self.state_names}

    def check_state_dict(self, state: Dict[str, object], path: str = "state") -> None:
        """Raises TypeError/ValueError naming the first bad entry of `state` (`path` names the state
        itself): exactly the keys of state_dict(), tensors of this problem's shapes and dtypes
        (nothing broadcast or cast), and values this problem can hold (_check_state_values). A
        subclass without state_names checks nothing here: its own load_state_dict must."""
        if self.state_names is None:
            return
        check_state_keys(state, path, self.state_names)
        for name in self.state_names:
            check_state_tensor(state[name], state_path(path, name), getattr(self, name))
        self._check_state_values(state, path)

    def _check_state_values(self, state: Dict[str, torch.Tensor], path: str) -> None:
        """The value ranges and consistency of a state whose keys, shapes and dtypes are right."""

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores a state_dict() of a problem with the same slots and configuration: checked
        whole first (check_state_dict), so a bad state raises and changes nothing."""
        self.check_state_dict(state)
        for name in self.state_names:
            getattr(self, name).copy_(state[name])


def _check_sizes(state: Dict[str, torch.Tensor], path: str, min_size: int, max_size: int) -> None:
    """The data sizes n: whole numbers in [min_size, max_size]."""
    n = state["n"]
    check_state_values(n, state_path(path, "n"), low=min_size, high=max_size)
    if not torch.equal(n, n.round()):
        raise ValueError(f"{state_path(path, 'n')}: the local data sizes must be whole numbers")


def _check_common(clients: int, sigma: float, min_size: int, max_size: int, device, dtype) -> torch.device:
    """The arguments both problems take; returns the device."""
    check_integer("clients", clients, low=1)
    check_number("sigma", sigma, 0.0)
    check_integer("min_size", min_size, low=1)
    check_integer("max_size", max_size, low=1)
    if min_size > max_size:
        raise ValueError(f"min_size, max_size: need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if dtype not in PROBLEM_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
    return check_device("device", device)


class QuadraticProblem(Problem):
    name = "quadratic"
    state_names = ("Q64", "Q", "b_mean", "lam", "bq", "n")

    def __init__(self, clients: int, dim: int = 20, *, kappa: float = 10.0, sigma: float = 1.0,
                 heterogeneity: float = 1.0, curvature_spread: float = 0.5, basis: str = "random",
                 min_size: int = 10, max_size: int = 100, device="cpu", dtype=torch.float32):
        device = _check_common(clients, sigma, min_size, max_size, device, dtype)
        check_integer("dim", dim, low=1)
        check_number("kappa", kappa, 1.0)
        check_number("heterogeneity", heterogeneity, 0.0)
        check_number("curvature_spread", curvature_spread, 0.0, 1.0)
        if basis not in ("random", "identity"):
            raise ValueError(f"basis: 'random' or 'identity', got {basis!r}")
        self.clients, self.dim = clients, dim
        self.kappa, self.sigma, self.heterogeneity = float(kappa), float(sigma), float(heterogeneity)
        self.curvature_spread, self.basis = float(curvature_spread), basis
        self.min_size, self.max_size = min_size, max_size
        self.device, self.dtype = device, dtype
        C, D = clients, dim
        self.Q64 = torch.eye(D, device=self.device, dtype=torch.float64)  # the exact basis; Q: its working copy
        self.Q = torch.eye(D, device=self.device, dtype=dtype)
        self.b_mean = torch.zeros(D, device=self.device, dtype=dtype)
        self.lam = torch.ones(C, D, device=self.device, dtype=dtype)   # eigenvalues of A_c
        self.bq = torch.zeros(C, D, device=self.device, dtype=dtype)   # b_c in Q's basis (B Q)
        self.n = torch.ones(C, device=self.device, dtype=dtype)

    def reset(self, generator: torch.Generator) -> None:
        D = self.dim
        if self.basis == "random":
            g = torch.randn(D, D, generator=generator, device=self.device, dtype=torch.float64)
            q, r = torch.linalg.qr(g)
            self.Q64.copy_(q * torch.sign(torch.diagonal(r)))  # Haar-distributed
            self.Q.copy_(self.Q64)
        self.b_mean.copy_(torch.randn(D, generator=generator, device=self.device, dtype=torch.float64) / math.sqrt(D))
        self.renew(torch.ones(self.clients, dtype=torch.bool, device=self.device), generator)

    def renew(self, joined: torch.Tensor, generator: torch.Generator) -> None:
        rows = torch.nonzero(joined).flatten()
        k, D = rows.numel(), self.dim
        if k == 0:
            return
        f64 = dict(device=self.device, dtype=torch.float64)
        u = torch.rand(k, D, generator=generator, **f64)
        base = torch.linspace(0.0, 1.0, D, **f64) if D > 1 else torch.zeros(1, **f64)
        s = (1.0 - self.curvature_spread) * base + self.curvature_spread * u
        span = s.amax(1, keepdim=True) - s.amin(1, keepdim=True)
        s = torch.where(span > 0, (s - s.amin(1, keepdim=True)) / span.clamp(min=1e-300), s.new_zeros(()))
        if D > 1:  # exactly [1/κ, 1] per client (also when h = 1 and the uniform draws miss the ends)
            lo, hi = s.argmin(1, keepdim=True), s.argmax(1, keepdim=True)
            s.scatter_(1, lo, 0.0)
            s.scatter_(1, hi, 1.0)
        lam = torch.pow(self.kappa, -s)
        b = self.b_mean.double() + self.heterogeneity * torch.randn(k, D, generator=generator, **f64) / math.sqrt(D)
        bq = b @ self.Q64 if self.basis == "random" else b
        n = _uniform_ints(self.min_size, self.max_size, k, generator, self.device)
        self.lam.index_copy_(0, rows, lam.to(self.dtype))
        self.bq.index_copy_(0, rows, bq.to(self.dtype))
        self.n.index_copy_(0, rows, n.to(self.dtype))

    def sizes(self) -> torch.Tensor:
        return self.n

    def grad(self, X: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.basis == "identity":
            G = (X - self.bq).mul_(self.lam)
        else:
            G = torch.addmm(-self.bq, X, self.Q).mul_(self.lam) @ self.Q.T
        noise = _noise(G.shape, self.sigma, generator, G.device, G.dtype)
        return G if noise is None else G.add_(noise)

    def matrices(self) -> torch.Tensor:
        """[C, D, D] float64 A_c (for tests; D small)."""
        Q = self.Q64
        return torch.einsum("ij,cj,kj->cik", Q, self.lam.double(), Q)

    def centres(self) -> torch.Tensor:
        """[C, D] float64 b_c."""
        return self.bq.double() @ self.Q64.T

    def optimum(self, active: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
        w = torch.where(active, weights.double(), 0.0).unsqueeze(1)
        h = (w * self.lam.double()).sum(0)
        if not bool(w.sum() > 0):
            return None
        yq = (w * self.lam.double() * self.bq.double()).sum(0) / h
        return self.Q64 @ yq

    def objective(self, x: torch.Tensor, active: torch.Tensor, weights: torch.Tensor) -> float:
        w = torch.where(active, weights.double(), 0.0)
        r = x.double() @ self.Q64 - self.bq.double()
        f = 0.5 * (self.lam.double() * r * r).sum(1)
        return float((w * f).sum() / w.sum())

    def _check_state_values(self, state: Dict[str, torch.Tensor], path: str) -> None:
        """Q64 orthogonal (the identity for basis="identity") and Q its rounding to the working
        dtype; finite centres; every curvature in [1/κ, 1] (up to the working dtype's rounding);
        whole data sizes in [min_size, max_size]."""
        Q64 = state["Q64"].to(self.device)
        check_state_values(Q64, state_path(path, "Q64"), finite=True)
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        if self.basis == "identity" and not torch.equal(Q64, eye):
            raise ValueError(f"{state_path(path, 'Q64')}: must be the identity (basis='identity')")
        if not torch.allclose(Q64.T @ Q64, eye, rtol=0, atol=1e-9 * self.dim):
            raise ValueError(f"{state_path(path, 'Q64')}: not an orthogonal matrix")
        if not torch.equal(state["Q"].to(self.device), Q64.to(self.dtype)):
            raise ValueError(f"{state_path(path, 'Q')}: must be {state_path(path, 'Q64')} in {self.dtype}")
        for name in ("b_mean", "bq"):
            check_state_values(state[name], state_path(path, name), finite=True)
        lowest = (1.0 / self.kappa) * (1.0 - 4.0 * torch.finfo(self.dtype).eps)
        check_state_values(state["lam"], state_path(path, "lam"), low=lowest, high=1.0)
        _check_sizes(state, path, self.min_size, self.max_size)


def load_dataset(name: str):
    """(A [N, D] float64 with the bias feature, scaled to L = 1; y [N] in {0, 1}; classes [N] int64)."""
    import numpy as np
    from sklearn import datasets

    if name == "breast_cancer":
        data = datasets.load_breast_cancer()
        classes = data.target.astype(np.int64)
        y = classes.astype(np.float64)
    elif name == "digits":
        data = datasets.load_digits()
        classes = data.target.astype(np.int64)
        y = (classes >= 5).astype(np.float64)
    else:
        raise ValueError(f"dataset: unknown {name!r}; expected one of {', '.join(DATASETS)}")
    X = data.data.astype(np.float64)
    sd = X.std(0)
    X = (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)
    A = np.concatenate([X, np.ones((X.shape[0], 1))], axis=1)
    L = 0.25 * np.linalg.eigvalsh(A.T @ A / A.shape[0]).max()
    A = A / math.sqrt(L)
    return torch.from_numpy(A), torch.from_numpy(y), torch.from_numpy(classes)


class LogRegProblem(Problem):
    name = "logreg"
    state_names = ("X", "y", "mask", "n", "idx", "x_warm")

    def __init__(self, clients: int, *, dataset: str = "breast_cancer", kappa: float = 10.0, sigma: float = 1.0,
                 label_skew: float = 0.5, min_size: int = 10, max_size: int = 50, batch_size: Optional[int] = None,
                 device="cpu", dtype=torch.float32):
        device = _check_common(clients, sigma, min_size, max_size, device, dtype)
        try:
            check_number("kappa", kappa, 1.0, low_open=True)
        except ValueError:
            raise ValueError(f"kappa: the logreg problem needs a finite condition number > 1 (μ = 1/(κ−1)), "
                             f"got {kappa!r}") from None
        check_number("label_skew", label_skew, 0.0, low_open=True)  # the Dirichlet concentration
        if batch_size is not None:
            check_integer("batch_size", batch_size, low=1)
        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise ValueError(f"dataset: unknown {dataset!r}; expected one of {', '.join(DATASETS)}")
        A, y, classes = load_dataset(dataset)
        self.clients, self.dim = clients, A.shape[1]
        self.dataset, self.kappa, self.sigma = dataset, float(kappa), float(sigma)
        self.mu = 1.0 / (self.kappa - 1.0)
        self.label_skew, self.min_size, self.max_size, self.batch_size = float(label_skew), min_size, max_size, batch_size
        self.device, self.dtype = device, dtype
        self.A_all = A.to(self.device)
        self.y_all = y.to(self.device)
        K = int(classes.max()) + 1
        counts = torch.bincount(classes, minlength=K)
        pools = torch.zeros(K, int(counts.max()), dtype=torch.int64)
        for k in range(K):  # K ≤ 10 classes, once: the class pools, padded
            members = torch.nonzero(classes == k).flatten()
            pools[k, :members.numel()] = members
        self.classes, self.pools, self.pool_counts = K, pools.to(self.device), counts.to(self.device)
        C, M, D = clients, max_size, self.dim
        self.X = torch.zeros(C, M, D, device=self.device, dtype=dtype)   # local samples, zero-padded
        self.y = torch.zeros(C, M, device=self.device, dtype=dtype)      # labels in {0, 1}
        self.mask = torch.zeros(C, M, device=self.device, dtype=dtype)   # 1 for the n_c real samples
        self.n = torch.ones(C, device=self.device, dtype=dtype)
        self.idx = torch.zeros(C, M, device=self.device, dtype=torch.int64)  # rows of the dataset
        self.x_warm = torch.zeros(D, device=self.device, dtype=torch.float64)  # Newton's warm start

    def reset(self, generator: torch.Generator) -> None:
        self.x_warm.zero_()
        self.renew(torch.ones(self.clients, dtype=torch.bool, device=self.device), generator)

    def _proportions(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """[k, K] Dirichlet(α) class proportions, from numpy seeded by the torch generator."""
        import numpy as np

        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device))
        rng = np.random.default_rng(seed)
        p = rng.dirichlet(np.full(self.classes, self.label_skew), size=k)
        return torch.from_numpy(p).to(self.device)

    def renew(self, joined: torch.Tensor, generator: torch.Generator) -> None:
        rows = torch.nonzero(joined).flatten()
        k, M = rows.numel(), self.max_size
        if k == 0:
            return
        p = self._proportions(k, generator)
        n = _uniform_ints(self.min_size, self.max_size, k, generator, self.device)
        u = torch.rand(k, M, generator=generator, device=self.device, dtype=torch.float64)
        v = torch.rand(k, M, generator=generator, device=self.device, dtype=torch.float64)
        cdf = torch.cumsum(p, 1)
        cls = (u.unsqueeze(2) > cdf.unsqueeze(1)).sum(2).clamp(max=self.classes - 1)
        j = torch.minimum((v * self.pool_counts[cls]).long(), self.pool_counts[cls] - 1)
        idx = self.pools[cls, j]
        mask = torch.arange(M, device=self.device).unsqueeze(0) < n.unsqueeze(1)
        self.idx.index_copy_(0, rows, idx)
        self.mask.index_copy_(0, rows, mask.to(self.dtype))
        self.n.index_copy_(0, rows, n.to(self.dtype))
        self.X.index_copy_(0, rows, self.A_all[idx].to(self.dtype))
        self.y.index_copy_(0, rows, self.y_all[idx].to(self.dtype))

    def sizes(self) -> torch.Tensor:
        return self.n

    def grad(self, X: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.batch_size is None:
            data, labels, weight = self.X, self.y, self.mask / self.n.unsqueeze(1)
        else:
            b = self.batch_size
            pick = (torch.rand(self.clients, b, generator=generator, device=self.device, dtype=torch.float64)
                    * self.n.double().unsqueeze(1)).long()
            pick = torch.minimum(pick, self.n.long().unsqueeze(1) - 1)
            data = torch.gather(self.X, 1, pick.unsqueeze(2).expand(-1, -1, self.dim))
            labels = torch.gather(self.y, 1, pick)
            weight = torch.full_like(labels, 1.0 / b)
        logits = torch.bmm(data, X.unsqueeze(2)).squeeze(2)
        r = (torch.sigmoid(logits) - labels).mul_(weight)
        G = torch.bmm(r.unsqueeze(1), data).squeeze(1).add_(X, alpha=self.mu)
        noise = _noise(G.shape, self.sigma, generator, G.device, G.dtype)
        return G if noise is None else G.add_(noise)

    def _pooled(self, active: torch.Tensor, weights: torch.Tensor):
        """The active clients' samples (float64, exact from the dataset) and per-sample weights summing to 1."""
        w = torch.where(active, weights.double(), 0.0)
        if not bool(w.sum() > 0):
            return None
        per_sample = (w / self.n.double()).unsqueeze(1) * self.mask.double()
        keep = per_sample > 0
        rows = self.idx[keep]
        omega = per_sample[keep]
        return self.A_all[rows], self.y_all[rows], omega / omega.sum()

    def objective(self, x: torch.Tensor, active: torch.Tensor, weights: torch.Tensor) -> float:
        pooled = self._pooled(active, weights)
        if pooled is None:
            return float("nan")
        A, y, omega = pooled
        z = A @ x.double()
        loss = torch.nn.functional.softplus(z) - y * z
        return float((omega * loss).sum() + 0.5 * self.mu * (x.double() @ x.double()))

    def optimum(self, active: torch.Tensor, weights: torch.Tensor) -> Optional[torch.Tensor]:
        pooled = self._pooled(active, weights)
        if pooled is None:
            return None
        A, y, omega = pooled
        D = self.dim
        eye = torch.eye(D, dtype=torch.float64, device=self.device)

        def value_grad(x):
            z = A @ x
            s = torch.sigmoid(z)
            f = (omega * (torch.nn.functional.softplus(z) - y * z)).sum() + 0.5 * self.mu * (x @ x)
            return f, A.T @ (omega * (s - y)) + self.mu * x, s

        x = self.x_warm.clone()
        g0 = float(torch.linalg.vector_norm(value_grad(torch.zeros_like(x))[1]))
        tol = 1e-12 * max(1.0, g0)
        f, g, s = value_grad(x)
        for _ in range(100):
            if float(torch.linalg.vector_norm(g)) <= tol:
                break
            H = (A * (omega * s * (1 - s)).unsqueeze(1)).T @ A + self.mu * eye
            step = torch.linalg.solve(H, g)
            t = 1.0
            while True:  # backtracking (Armijo); Newton's full step is taken near the optimum
                candidate = x - t * step
                fc, gc, sc = value_grad(candidate)
                if fc <= f - 1e-4 * t * (g @ step) or t < 1e-10:
                    break
                t *= 0.5
            if float(fc) >= float(f) and t < 1e-10:
                break
            x, f, g, s = candidate, fc, gc, sc
        self.x_warm.copy_(x)
        return x

    def _check_state_values(self, state: Dict[str, torch.Tensor], path: str) -> None:
        """Sample indices into the dataset, and X, y the dataset's rows at them; a mask of the first
        n_c samples per slot; whole data sizes in [min_size, max_size]; a finite warm start."""
        idx = state["idx"]
        check_state_values(idx, state_path(path, "idx"), low=0, high=self.A_all.shape[0] - 1)
        idx = idx.to(self.device)
        for name, data in (("X", self.A_all), ("y", self.y_all)):
            if not torch.equal(state[name].to(self.device), data[idx].to(self.dtype)):
                raise ValueError(f"{state_path(path, name)}: not the dataset's rows at {state_path(path, 'idx')}")
        _check_sizes(state, path, self.min_size, self.max_size)
        n = state["n"].to(self.device)
        first = torch.arange(self.max_size, device=self.device).unsqueeze(0) < n.unsqueeze(1)
        if not torch.equal(state["mask"].to(self.device), first.to(self.dtype)):
            raise ValueError(f"{state_path(path, 'mask')}: must mark the first n_c samples of each slot "
                             f"({state_path(path, 'n')})")
        check_state_values(state["x_warm"], state_path(path, "x_warm"), finite=True)


_CLASSES = {"quadratic": QuadraticProblem, "logreg": LogRegProblem}


def problem_options(name: str) -> Tuple[str, ...]:
    """The further options of problem `name` (the keyword arguments of its constructor that
    make_problem does not set itself)."""
    parameters = inspect.signature(_CLASSES[name]).parameters
    return tuple(p for p, spec in parameters.items()
                 if spec.kind == inspect.Parameter.KEYWORD_ONLY and p not in ("kappa", "sigma", "device", "dtype"))


def make_problem(name: str, clients: int, *, dim: int = 20, kappa: float = 10.0, sigma: float = 1.0,
                 device="cpu", dtype=torch.float32, **options) -> Problem:
    """`name` in PROBLEMS; options (problem_options(name)) go to the problem's constructor (dim
    only to the quadratic)."""
    if not isinstance(name, str) or name not in PROBLEMS:
        raise ValueError(f"problem: unknown {name!r}; expected one of {', '.join(PROBLEMS)}")
    for option in options:
        if option not in problem_options(name):
            raise TypeError(f"{option}: not an option of the {name} problem; expected one of "
                            f"{', '.join(problem_options(name))}")
    if name == "quadratic":
        return QuadraticProblem(clients, dim, kappa=kappa, sigma=sigma, device=device, dtype=dtype, **options)
    return LogRegProblem(clients, kappa=kappa, sigma=sigma, device=device, dtype=dtype, **options)
