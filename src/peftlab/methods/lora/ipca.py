"""Incremental PCA over batches, as EVA needs it: the top right-singular vectors of all the data seen so far.

The update is Ross et al. 2008 as scikit-learn's IncrementalPCA computes it (and HF PEFT's EVA, whose numbers we
match): SVD of [S·Vᵀ of the batches so far; this batch centred on its own mean; a mean-correction row], with
running mean and variance kept in float64. Each SVD is torch.svd_lowrank with q = 2k, 4 subspace iterations and
seed 42 drawn from a forked RNG, PEFT's choice: reproducible, and the caller's random stream is left untouched.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

LOWRANK_SEED = 42
LOWRANK_NITER = 4


class IncrementalPCA:
    """k components of d-dimensional rows, fitted one batch at a time with partial_fit."""

    def __init__(self, n_components: int):
        self.k = n_components
        self.components: Optional[torch.Tensor] = None            # (k, d) right-singular vectors, sign-fixed
        self.singular_values: Optional[torch.Tensor] = None       # (k,)
        self.explained_variance_ratio: Optional[torch.Tensor] = None
        self.mean: Optional[torch.Tensor] = None                   # float64 (d,)
        self.var: Optional[torch.Tensor] = None
        self.n_seen = 0

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.to(torch.float32, copy=True)
        n, d = x.shape
        if self.k > d:
            raise ValueError(f"EVA: {self.k} components (rho * r) exceed the layer's input dimension {d}; lower "
                             f"r, rho or the rank_pattern for this layer")
        mean, var, total = self._moments(x)
        if self.components is None:
            x.sub_(mean)                                  # stays float32, as in scikit-learn's first step
        else:
            batch_mean = x.mean(dim=0)
            x -= batch_mean
            correction = math.sqrt(self.n_seen / total * n) * (self.mean - batch_mean)
            # the float64 correction row makes the stacked matrix float64 from the second batch on
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, correction))
        s, vt = self._svd(x)
        self.n_seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vt[: self.k], s[: self.k]
        self.explained_variance_ratio = (s ** 2 / torch.sum(var * total))[: self.k]

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Running mean and variance (Chan et al.'s pairwise update) after adding the rows of x."""
        n, total = x.shape[0], self.n_seen + x.shape[0]
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if self.mean is None \
            else self.mean * self.n_seen
        new_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - new_sum / n
        new_m2 = centred.square().sum(dim=0, dtype=torch.float64) - centred.sum(dim=0, dtype=torch.float64).square() / n
        if self.var is None:
            return (last_sum + new_sum) / total, new_m2 / total, total
        ratio = self.n_seen / n
        m2 = self.var * self.n_seen + new_m2 + ratio / total * (last_sum / ratio - new_sum).square()
        return (last_sum + new_sum) / total, m2 / total, total

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, Vᵀ) with each row of Vᵀ signed so that its largest-magnitude entry is positive."""
        with torch.random.fork_rng():
            torch.manual_seed(LOWRANK_SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=LOWRANK_NITER)
        vt = v.mH
        signs = torch.sign(vt.gather(1, vt.abs().argmax(dim=1, keepdim=True)))
        return s, vt * signs


class ConvergingPCA:
    """An incremental PCA that also tracks which of its components have converged (EVA: the cosine similarity of
    each component with the previous batch's reaches tau)."""

    def __init__(self, n_components: int, tau: float, name: str):
        self.pca, self.tau, self.name = IncrementalPCA(n_components), tau, name
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    def update(self, rows: torch.Tensor) -> None:
        if rows.shape[0] < self.pca.k:  # too few rows for k components: this batch is skipped for this layer
            return
        previous = self.pca.components
        self.pca.partial_fit(rows)
        if previous is not None:
            sim = torch.nn.functional.cosine_similarity(self.pca.components, previous)
            self.converged = (sim >= self.tau).cpu()
