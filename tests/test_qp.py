"""GEM's projection against quadprog (the original code's solver) and against the KKT conditions."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

from harness.gem import project_gradient, solve_dual


def dual_problem(g: torch.Tensor, G: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    gram = G @ G.T
    return 0.5 * (gram + gram.T) + eps * torch.eye(len(G), dtype=G.dtype), G @ g


def quadprog_dual(gram: torch.Tensor, linear: torch.Tensor, margin: float) -> torch.Tensor:
    t = len(linear)
    v = quadprog.solve_qp(gram.numpy(), -linear.numpy(), np.eye(t), np.full(t, margin))[0]
    return torch.from_numpy(v)


def kkt_residual(gram: torch.Tensor, linear: torch.Tensor, v: torch.Tensor, margin: float) -> float:
    """Largest violation of primal feasibility, dual feasibility and complementarity, relative to the data."""
    u, w = v - margin, gram @ v + linear
    scale = float(linear.abs().max() + gram.abs().max() * (1 + v.abs().max()))
    return max(float((-u).clamp_min(0).max()), float((-w).clamp_min(0).max()) / scale,
               float((u * w).abs().max()) / (scale * (1 + float(u.abs().max()))))


def objective(gram: torch.Tensor, linear: torch.Tensor, v: torch.Tensor) -> float:
    return float(0.5 * v @ gram @ v + linear @ v)


def random_problem(rng: np.random.Generator, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = int(rng.integers(4, 200))
    G = torch.from_numpy(rng.standard_normal((t, p))) * 10 ** rng.uniform(-4, 4)
    g = torch.from_numpy(rng.standard_normal(p)) * 10 ** rng.uniform(-4, 4)
    kind = rng.integers(3)
    if kind == 1 and t > 1:
        G[-1] = G[0]  # duplicate constraint
    if kind == 2 and t > 2:
        G[-1] = 2 * G[0] - G[1]  # rank-deficient
    g = g - 2 * G[0] * (G[0] @ g).abs() / (G[0] @ G[0])  # make sure some constraint is violated
    return g, G


@pytest.mark.parametrize("t", range(1, 20))
def test_agrees_with_quadprog_and_satisfies_kkt(t: int) -> None:
    rng = np.random.default_rng(t)
    compared = 0
    for _ in range(12):
        g, G = random_problem(rng, t)
        margin, eps = float(rng.choice([0.0, 0.5])), 1e-3
        gram, linear = dual_problem(g, G, eps)
        v, converged = solve_dual(gram, linear, margin)
        assert bool(converged)
        assert kkt_residual(gram, linear, v, margin) < 1e-7
        try:
            v_ref = quadprog_dual(gram, linear, margin)
        except ValueError:  # quadprog gives up on some badly scaled problems; KKT above still holds for ours
            continue
        ours, ref = project_gradient(g, G, margin, eps), G.T @ v_ref + g
        if kkt_residual(gram, linear, v_ref, margin) < 1e-9:
            compared += 1
            assert torch.linalg.norm(ours - ref) <= 1e-6 * torch.linalg.norm(ref)
        else:  # quadprog itself is inaccurate here: ours must be at least as good a minimiser
            assert objective(gram, linear, v) <= objective(gram, linear, v_ref) + 1e-9 * abs(objective(gram, linear, v_ref))
    assert compared >= 6


def test_projection_respects_every_constraint_when_margin_is_zero() -> None:
    rng = np.random.default_rng(0)
    for t in (1, 3, 7, 19):
        g, G = random_problem(rng, t)
        projected = project_gradient(g, G, 0.0, 0.0)
        assert (G @ projected).min() >= -1e-9 * float(G.norm(dim=1).max() * g.norm())


def test_gradient_unchanged_when_no_constraint_is_violated() -> None:
    torch.manual_seed(0)
    G = torch.rand(4, 30, dtype=torch.float64)  # non-negative rows and gradient: every ⟨g, g_k⟩ > 0
    g = torch.rand(30, dtype=torch.float64)
    assert torch.equal(project_gradient(g, G, 0.5, 1e-3), g)
    g[0] = -1e3  # now some constraint is violated and g must change
    assert (G @ g < 0).any() and not torch.equal(project_gradient(g, G, 0.5, 1e-3), g)


def test_singular_gram_with_zero_eps_does_not_crash() -> None:
    torch.manual_seed(0)
    G = torch.randn(6, 20, dtype=torch.float64)
    G[1] = G[0]
    G[3] = G[2]
    G[5] = G[0] + G[2]
    g = -(G[0] + G[2] + G[4])
    projected = project_gradient(g, G, 0.0, 0.0)
    assert torch.isfinite(projected).all()
    assert (G @ projected).min() >= -1e-9 * float(G.norm(dim=1).max() * g.norm())
    with pytest.raises(ValueError):  # the reference solver cannot do this one
        quadprog_dual(*dual_problem(g, G, 0.0), 0.0)


def test_result_keeps_the_input_dtype_and_device() -> None:
    torch.manual_seed(0)
    G = torch.randn(3, 10)
    g = -G.sum(0)
    out = project_gradient(g, G, 0.5, 1e-3)
    assert out.dtype == torch.float32 and out.device == g.device
