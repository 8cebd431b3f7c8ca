"""Continual-learning metrics from an accuracy matrix R, where R[i, j] is the accuracy on task j's test
set after training task i (T x T), and b[j] is the accuracy on task j before any training.

ACC, BWT and FWT follow Lopez-Paz & Ranzato (2017). The paper averages BWT over the T-1 old tasks and FWT
over the T-1 tasks that had a predecessor; the original code takes the mean of length-T vectors whose
unused entry is 0, i.e. divides by T. Both are reported (``*_bwt``/``*_fwt`` and ``*_bwt_code``/``*_fwt_code``).
"""

from __future__ import annotations

import math

import numpy as np


def accuracy(R: np.ndarray) -> float:
    """ACC: mean accuracy over all tasks after the last one."""
    return float(np.mean(R[-1]))


def _bwt_terms(R: np.ndarray) -> np.ndarray:
    T = len(R)
    return np.array([R[T - 1, j] - R[j, j] for j in range(T - 1)])


def _fwt_terms(R: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([R[j - 1, j] - b[j] for j in range(1, len(R))])


def backward_transfer(R: np.ndarray, *, paper: bool = True) -> float:
    """BWT: how much learning later tasks changed accuracy on earlier ones (negative = forgetting)."""
    T = len(R)
    if T < 2:
        return math.nan
    return float(_bwt_terms(R).sum() / (T - 1 if paper else T))


def forward_transfer(R: np.ndarray, b: np.ndarray, *, paper: bool = True) -> float:
    """FWT: accuracy on a task before training it, relative to the untrained network's ``b``."""
    T = len(R)
    if T < 2:
        return math.nan
    return float(_fwt_terms(R, b).sum() / (T - 1 if paper else T))


def forgetting(R: np.ndarray) -> float:
    """Average forgetting (Chaudhry et al. 2018): best accuracy ever reached on an old task minus final."""
    T = len(R)
    if T < 2:
        return math.nan
    return float(np.mean([R[j : T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))


def seen_accuracy(R: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """A_i: accuracy over the test examples of every task seen after task i (weighted by test-set size)."""
    return np.array([np.dot(R[i, : i + 1], sizes[: i + 1]) / sizes[: i + 1].sum() for i in range(len(R))])


def average_incremental_accuracy(R: np.ndarray, sizes: np.ndarray) -> float:
    """Rebuffi et al. (2017): the mean of A_i over all steps."""
    return float(np.mean(seen_accuracy(R, sizes)))


def old_new_accuracy(R: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """After each task i: accuracy on tasks before i (NaN for i = 0) and on task i itself."""
    old = np.array([np.dot(R[i, :i], sizes[:i]) / sizes[:i].sum() if i else math.nan for i in range(len(R))])
    return old, np.diag(R).copy()


def summarize(R: np.ndarray, b: np.ndarray, sizes: np.ndarray, prefix: str) -> dict[str, float]:
    """Every summary metric of one accuracy matrix, names prefixed (``cil``, ``til``, ``nme_cil``, ...)."""
    return {
        f"{prefix}_acc": accuracy(R),
        f"{prefix}_bwt": backward_transfer(R),
        f"{prefix}_fwt": forward_transfer(R, b),
        f"{prefix}_bwt_code": backward_transfer(R, paper=False),
        f"{prefix}_fwt_code": forward_transfer(R, b, paper=False),
        f"{prefix}_forgetting": forgetting(R),
        f"{prefix}_avg_incremental": average_incremental_accuracy(R, sizes),
    }
