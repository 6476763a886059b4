"""Image edges as oriented energy: ``|g_u * x|^2 + |g_v * x|^2`` (paper Section 5.3, Eq. 3).

``g_u`` and ``g_v`` are horizontal and vertical Gaussian-derivative filters of scale ``sigma``,
applied to every channel separately with replicate padding, so that flat regions (also at the
border) have exactly zero energy.

:func:`contour_energy` is the teacher the authors' released code trains against instead
(``gradient_teachers.ContourEnergy``): blur, half-Sobel derivatives, the square root of their
energy summed over channels, blurred again, with reflect padding throughout.
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


def discrete_gaussian_kernel(t: float, dtype: torch.dtype = torch.float32,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Lindeberg's discrete Gaussian ``exp(-t) I_n(t)`` for ``n = -ceil(3 t) .. ceil(3 t)``, normalized to sum 1.

    ``I_n`` is the modified Bessel function of the first kind; the kernel's variance is ``t``. The authors'
    code builds its blur this way from its ``sigma`` argument (``t = sigma``; at the default 1 the standard
    deviation is 1 as well).
    """
    if t <= 0:
        raise ValueError(f"t={t} must be positive")
    radius = math.ceil(3 * t)
    half_t = math.log(t / 2)

    def bessel_i(n: int) -> float:  # the power series sum_k (t/2)^(2k+n) / (k! (k+n)!), in log space
        terms = [(2 * k + n) * half_t - math.lgamma(k + 1) - math.lgamma(k + n + 1) for k in range(int(4 * t) + 40)]
        top = max(terms)
        return math.exp(top) * math.fsum(math.exp(v - top) for v in terms)

    values = [bessel_i(abs(n)) for n in range(-radius, radius + 1)]  # I_{-n} = I_n; exp(-t) cancels below
    kernel = torch.tensor(values, dtype=torch.float64)
    return (kernel / kernel.sum()).to(dtype=dtype, device=device)


def _reflect_blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of every channel with the 1-D ``kernel``: reflect padding, then down the rows, then across."""
    c, k = x.shape[1], kernel.numel()
    r = k // 2
    padded = F.pad(x, (r, r, r, r), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(rows, kernel.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


@torch.no_grad()
def contour_energy(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The authors' code's edge teacher for images ``x`` (N, C, H, W); same shape, equal across channels.

    ``blur(sqrt(sum_c (s_u * blur(x_c))^2 + (s_v * blur(x_c))^2))`` with ``blur`` the
    :func:`discrete_gaussian_kernel` of ``t = sigma``, ``s_u, s_v`` half the 3x3 Sobel filters (rows
    ``[-1/2, 0, 1/2], [-1, 0, 1], [-1/2, 0, 1/2]`` and the transpose) and reflect padding at every step; no
    epsilon under the square root. Reflect padding needs ``ceil(3 sigma) < min(H, W)``.
    """
    x = x.float()
    kernel = discrete_gaussian_kernel(sigma, x.dtype, x.device)
    blurred = F.pad(_reflect_blur(x, kernel), (1, 1, 1, 1), mode="reflect")
    c = x.shape[1]
    s_u, s_v = (g / 2 for g in sobel_filters(x.dtype, x.device))
    d_u = F.conv2d(blurred, s_u.expand(c, 1, 3, 3), groups=c)
    d_v = F.conv2d(blurred, s_v.expand(c, 1, 3, 3), groups=c)
    energy = (d_u**2 + d_v**2).sum(1, keepdim=True).sqrt()
    return _reflect_blur(energy, kernel).expand(-1, c, -1, -1)


def log_correlation(a: torch.Tensor, b: torch.Tensor, floor_a: float = 1e-30, floor_b: float = 1e-3) -> torch.Tensor:
    """Per image, the Pearson correlation of ``log a`` and ``log b`` over pixels.

    ``a`` and ``b`` are non-negative maps of the same shape (N, ...); each is clamped below at its
    floor before the log (the paper clamps oriented energy at 1e-3). A constant map gives NaN.
    """
    la = a.detach().double().flatten(1).clamp_min(floor_a).log()
    lb = b.detach().double().flatten(1).clamp_min(floor_b).log()
    la, lb = la - la.mean(1, keepdim=True), lb - lb.mean(1, keepdim=True)
    return (la * lb).sum(1) / (la.norm(dim=1) * lb.norm(dim=1))
