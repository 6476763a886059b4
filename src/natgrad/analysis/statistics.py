"""Summaries of per-image values: means, conditional means, log-scale histograms.

Histograms carry explicit outer edges 0 and infinity, so every value is counted exactly once
(zeros included, which log-scale plots cannot show but the counts keep). ``analysis.json`` writes
the infinite last edge as null, since JSON has no infinity.
"""

from __future__ import annotations

import math

import torch


def log_edges(low: float, high: float, bins_per_decade: int = 10) -> torch.Tensor:
    """``[0, 10^a, ..., 10^b, inf]`` with ``10^a <= low`` and ``10^b >= high`` (positive bounds)."""
    a = math.floor(math.log10(low))
    b = max(a + 1, math.ceil(math.log10(high)))
    inner = torch.logspace(a, b, (b - a) * bins_per_decade + 1, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), inner, torch.full((1,), math.inf, dtype=torch.float64)])


def edges_for(values: torch.Tensor, bins_per_decade: int = 10) -> torch.Tensor:
    """Log edges spanning the positive finite ``values`` (a default decade where there are none)."""
    v = values[(values > 0) & values.isfinite()].double()
    if not len(v):
        return log_edges(1.0, 10.0, bins_per_decade)
    return log_edges(v.min().item(), v.max().item(), bins_per_decade)


def count(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``values`` (any shape, non-negative) in the bins ``[edges[i], edges[i+1])``; the last bin holds inf."""
    v = values.detach().flatten().double().cpu()
    if (v < 0).any() or v.isnan().any():
        raise ValueError("histogram values must be non-negative numbers")
    index = torch.bucketize(v, edges, right=True) - 1
    return torch.bincount(index.clamp(max=len(edges) - 2), minlength=len(edges) - 1)


def histogram(values: torch.Tensor, edges: torch.Tensor | None = None) -> dict:
    """``{"edges": [...], "counts": [...]}`` of non-negative values; log edges from the data by default."""
    edges = edges_for(values) if edges is None else edges
    return {"edges": edges.tolist(), "counts": count(values, edges).tolist()}


def mean_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation in float64."""
    v = values.double()
    return v.mean().item(), v.std(unbiased=False).item() if len(v) > 1 else 0.0


def conditional_means(values: torch.Tensor, condition: torch.Tensor) -> tuple[float, float, float]:
    """Mean of ``values`` overall, where ``condition`` is false and where it is true (NaN for an empty group)."""
    v = values.double()
    nan = math.nan
    return (v.mean().item(), v[~condition].mean().item() if (~condition).any() else nan,
            v[condition].mean().item() if condition.any() else nan)
