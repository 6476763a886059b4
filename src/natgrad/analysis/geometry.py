"""Second-order geometry of the loss around inputs (paper Appendix A).

Every function takes ``loss_fn``, which maps a batch of inputs to one loss per image, so the
same code serves the model's cross-entropy and the analytic losses of the tests. The loss of a
batch is a sum of per-image terms, each depending only on its own image, so its input-Hessian is
block-diagonal: one Hessian-vector product of the summed loss is a batch of per-image products.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from natgrad.gradients import LossFn, loss_and_gradient


def _per_image_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def hessian_spectral_norm(loss_fn: LossFn, x: torch.Tensor, iterations: int = 20, init: str = "random",
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: the loss, its input gradient and the Hessian spectral norm ``||H||_2`` by power iteration.

    Each iteration is one batched Hessian-vector product; ``||H v||`` for the unit vector ``v`` it
    converges to is the largest absolute eigenvalue. ``init``: ``random`` (Gaussian) or
    ``gradient`` (start from the gradient, the paper's cheaper choice for Figure 11).
    """
    if iterations < 1:
        raise ValueError(f"iterations={iterations} must be at least 1")
    xl, loss, grad = loss_and_gradient(loss_fn, x, create_graph=True)
    if init == "gradient":
        v = grad.detach().clone()
    elif init == "random":
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    else:
        raise ValueError(f"init={init!r} is not one of random, gradient")
    norm = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for i in range(iterations):
            v = v / _per_image_norm(v).clamp_min(torch.finfo(v.dtype).tiny).view(-1, *[1] * (v.dim() - 1))
            (hv,) = torch.autograd.grad(grad, xl, v, retain_graph=i < iterations - 1)
            norm = _per_image_norm(hv)
            v = hv.detach()
    return loss.detach(), grad.detach(), norm.detach()


def normalized_curvature(hessian_norm: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Srinivas et al.'s ``C = ||H||_2 / ||g||_2`` per image (a zero gradient gives infinity)."""
    return hessian_norm / _per_image_norm(grad)


def local_linearity_error(loss_fn: LossFn, x: torch.Tensor, eps: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 5-6 for one draw per image: ``|a L(x+n1) + (1-a) L(x+n2) - L(x + a n1 + (1-a) n2)|^2``.

    ``a ~ U(0, 1)`` and ``n1, n2 ~ U(-eps, eps)`` elementwise. Points are not clipped to the image
    range: the error measures the function, as Rocamora et al. define it.
    """
    n = len(x)
    shape = (n,) + (1,) * (x.dim() - 1)
    a = torch.rand(shape, generator=generator, dtype=x.dtype).to(x.device)
    n1, n2 = ((torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps for _ in range(2))
    n1, n2 = n1.to(x.device), n2.to(x.device)
    with torch.no_grad():
        l1, l2, l_mix = (loss_fn(z) for z in (x + n1, x + n2, x + a * n1 + (1 - a) * n2))
    a = a.view(n)
    return (a * l1 + (1 - a) * l2 - l_mix) ** 2
