"""Image edges as oriented energy: ``|g_u * x|^2 + |g_v * x|^2`` (paper Section 5.3, Eq. 3).

``g_u`` and ``g_v`` are horizontal and vertical Gaussian-derivative filters of scale ``sigma``,
applied to every channel separately with replicate padding, so that flat regions (also at the
border) have exactly zero energy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_derivative_filters(sigma: float, dtype: torch.dtype = torch.float32,
                                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (k, k) filters ``g_u = d/du G_sigma`` and ``g_v = d/dv G_sigma``, k = 2 * ceil(3 sigma) + 1.

    Normalized so that a unit-slope ramp ``x(u, v) = u`` gives ``g_u * x = 1``.
    """
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be positive")
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    dg = t * g  # the derivative of G up to sign, oriented for correlation (what conv2d computes)
    dg = dg / (t * dg).sum()  # unit response to a unit ramp
    g_u = torch.outer(g, dg)  # rows are v (smoothing), columns are u (derivative)
    return g_u.to(dtype=dtype, device=device), g_u.t().contiguous().to(dtype=dtype, device=device)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    r = kernel.shape[-1] // 2
    padded = F.pad(x, (r, r, r, r), mode="replicate")
    return F.conv2d(padded, kernel.expand(c, 1, *kernel.shape), groups=c)


@torch.no_grad()
def oriented_energy(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Per-channel oriented energy of images ``x`` (N, C, H, W); same shape as ``x``."""
    g_u, g_v = gaussian_derivative_filters(sigma, x.dtype, x.device)
    return _filter(x, g_u) ** 2 + _filter(x, g_v) ** 2


@torch.no_grad()
def edge_map(x: torch.Tensor, sigma: float = 1.0, kind: str = "energy") -> torch.Tensor:
    """``energy``: oriented energy; ``magnitude``: its square root, the gradient magnitude of the blurred image."""
    energy = oriented_energy(x.float(), sigma)
    if kind == "energy":
        return energy
    if kind == "magnitude":
        return energy.sqrt()
    raise ValueError(f"edge kind {kind!r} is not one of energy, magnitude")


def sobel_filters(dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 Sobel filters ``(g_u, g_v)`` (horizontal and vertical derivatives), unnormalized."""
    g_u = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=device)
    return g_u, g_u.t().contiguous()


@torch.no_grad()
def sobel_energy(x: torch.Tensor) -> torch.Tensor:
    """Oriented energy with Sobel filters, summed over channels: (N, H, W), as Table 5 measures edges."""
    g_u, g_v = sobel_filters(x.dtype, x.device)
    return (_filter(x, g_u) ** 2 + _filter(x, g_v) ** 2).sum(1)


def log_correlation(a: torch.Tensor, b: torch.Tensor, floor_a: float = 1e-30, floor_b: float = 1e-3) -> torch.Tensor:
    """Per image, the Pearson correlation of ``log a`` and ``log b`` over pixels.

    ``a`` and ``b`` are non-negative maps of the same shape (N, ...); each is clamped below at its
    floor before the log (the paper clamps oriented energy at 1e-3). A constant map gives NaN.
    """
    la = a.detach().double().flatten(1).clamp_min(floor_a).log()
    lb = b.detach().double().flatten(1).clamp_min(floor_b).log()
    la, lb = la - la.mean(1, keepdim=True), lb - lb.mean(1, keepdim=True)
    return (la * lb).sum(1) / (la.norm(dim=1) * lb.norm(dim=1))
