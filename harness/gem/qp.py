"""GEM's projection (Lopez-Paz & Ranzato 2017, eqs. 10-13), solved exactly on the model's device.

GEM wants the update g̃ closest to the current gradient g that does not increase any past task's loss:
min_z ½‖g − z‖² s.t. ⟨z, g_k⟩ ≥ 0 for every past task k. Its dual, with G = [g_1 … g_t] as rows, is

    min_v ½ vᵀ(GGᵀ + εI)v + (Gg)ᵀv   s.t.  v ≥ γ,        then  g̃ = Gᵀv + g,

where γ (``memory_strength``) pushes the update beyond mere non-interference and ε regularises a
singular Gram matrix. With u = v − γ the dual is a non-negative least-squares problem in disguise
(GGᵀ + εI is the Gram matrix of [Gᵀ; √ε I]), so Lawson & Hanson's active-set method solves it exactly in a
finite number of steps. Each step here is branch-free tensor code in float64, so the whole solve stays on
the GPU and never synchronises with the host; on the CPU it stops as soon as it has converged.
"""

from __future__ import annotations

import torch


def _solve_on_passive_set(gram: torch.Tensor, rhs: torch.Tensor, passive: torch.Tensor) -> torch.Tensor:
    """z with z_P = gram_PP⁻¹ rhs_P and z = 0 off the passive set P (fixed shapes, no indexing by P)."""
    both = passive[:, None] & passive[None, :]
    eye = torch.eye(len(rhs), dtype=gram.dtype, device=gram.device)
    # The 1e-12 ridge keeps a rank-deficient Gram (ε = 0, duplicate rows) factorizable; its effect on the
    # solution is far below the 1e-6 agreement GEM needs.
    exact = torch.where(both, gram, 0.0) + eye * (~passive)
    factor, _ = torch.linalg.cholesky_ex(exact + eye * torch.where(passive, 1e-12, 0.0))
    b = torch.where(passive, rhs, 0.0)[:, None]
    z = torch.cholesky_solve(b, factor)
    for _ in range(2):  # iterative refinement against the un-ridged system recovers the lost digits
        z = z + torch.cholesky_solve(b - exact @ z, factor)
    return torch.where(passive, z[:, 0], 0.0)


def solve_dual(gram: torch.Tensor, linear: torch.Tensor, lower: float,
               max_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve min_v ½vᵀ·gram·v + linearᵀv s.t. v ≥ lower exactly; returns (v, converged).

    ``gram`` must be symmetric positive semi-definite (GGᵀ + εI). ``converged`` is a 0-d bool tensor: false
    only if ``max_steps`` (default 4t + 8; Lawson–Hanson needs about t) ran out first.
    """
    t = gram.shape[0]
    scale = gram.diagonal().max().clamp_min(torch.finfo(gram.dtype).tiny)
    m = gram / scale  # the minimiser does not change when the objective is scaled
    c = (linear + gram.sum(1) * lower) / scale  # u = v − lower turns the bound into u ≥ 0
    tol = 1e-12 * (1.0 + c.abs().max())
    u = torch.zeros_like(c)
    passive = torch.zeros(t, dtype=torch.bool, device=c.device)
    converged = torch.zeros((), dtype=torch.bool, device=c.device)
    for _ in range(max_steps if max_steps is not None else 4 * t + 8):
        z = _solve_on_passive_set(m, -c, passive)
        # Inner step: z leaves the feasible set, so walk from u towards z until a passive variable hits 0.
        infeasible = passive & (z <= 0)
        ratio = torch.where(infeasible, u / (u - z).clamp_min(torch.finfo(c.dtype).tiny), torch.inf)
        alpha = ratio.min().clamp(0.0, 1.0)
        hits = infeasible & (ratio <= alpha)
        u_inner = torch.where(hits, 0.0, (u + alpha * (z - u)).clamp_min(0.0))
        # Outer step: z is feasible; free the variable whose multiplier (negative gradient) is largest.
        w = -(m @ z + c)
        candidates = ~passive & (w > tol)
        best = torch.where(candidates, w, -torch.inf).argmax()
        add = candidates.any() & (torch.arange(t, device=c.device) == best)
        inner = infeasible.any()
        u = torch.where(inner, u_inner, z)
        passive = torch.where(inner, passive & ~hits & (u_inner > 0), passive | add)
        converged = ~inner & ~candidates.any()
        if c.device.type == "cpu" and bool(converged):
            break  # a host check costs nothing on the CPU
    return u + lower, converged


def gradient_projection(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g̃, violated, converged): the projected gradient, whether any ⟨g, g_k⟩ < 0, whether the QP converged."""
    g64, G64 = g.double(), G.double()
    dots = G64 @ g64
    violated = (dots < 0).any()
    gram = G64 @ G64.T
    gram = 0.5 * (gram + gram.T) + eps * torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    v, converged = solve_dual(gram, dots, margin)
    projected = (G64.T @ v + g64).to(g.dtype)
    return torch.where(violated, projected, g), violated, converged | ~violated


def project_gradient(g: torch.Tensor, G: torch.Tensor, margin: float, eps: float) -> torch.Tensor:
    """GEM's update direction for current gradient ``g`` [p] and past-task gradients ``G`` [t, p].

    Returns ``g`` unchanged when no constraint is violated (every ⟨g, g_k⟩ ≥ 0); otherwise g̃ = Gᵀv + g
    with v from the dual QP (``margin`` = γ, ``eps`` = ε). Float64 throughout, on ``g``'s device, no host
    synchronisation.
    """
    return gradient_projection(g, G, margin, eps)[0]
