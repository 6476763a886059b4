"""GradNorm, the paper's Eq. 2: by double backprop (``gradnorm``) or by finite differences (``gradnorm-fd``).

``loss = ce_weight * CE + gn_weight * w(t) * eps * mean_i ||c * grad_x CE_i||`` with x in pixel
space, which equals the paper's ``(eps / sigma) ||grad_{x_normalized} CE||_1`` for the L1 norm and
``c = 1``. Gradients are taken of the *sum* of per-image losses, so each image's gradient is its
own (not 1/B of it, as the gradient of a batch-mean loss would be), exactly so where no layer mixes the
images of a batch (``model.train_mode=eval`` freezes BatchNorm). The penalty's eps may differ from the
inputs' (``gradnorm.eps``: the authors' CIFAR-10 code penalizes at 4/255 while attacking at 8/255).

Options: ``norm`` (l1, l2), per-channel weights ``c`` (Section 5.2), and ``input_noise`` (Table 8):
the whole loss, CE and penalty, is taken at a gaussian-, uniform- or PGD-perturbed input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from natgrad.attacks import pgd
from natgrad.choices import DoubleBackward, FDPrecision, FDScheme, InputNoise, PenaltyNorm
from natgrad.errors import UserError
from natgrad.gradients import compiled_with_input_gradient, func_input_gradient, input_gradient
from natgrad.losses import per_sample_ce
from natgrad.objectives.base import Objective, linear_warmup


class GradNorm(Objective):
    """Penalize the norm of the loss-input gradient, by double backprop."""

    def __init__(self, model: nn.Module, eps: float, ce_weight: float = 1.0, gn_weight: float = 1.0,
                 warmup_epochs: float = 0.0, norm: PenaltyNorm = "l1", channel_weights: Sequence[float] | None = None,
                 input_noise: InputNoise = "none", noise_std: float | None = None, attack_steps: int = 3,
                 attack_step_size: float | None = None, attack_random_start: bool | None = False,
                 penalty_eps: float | None = None, double_backward: DoubleBackward = "natgrad"):
        """``eps`` is the radius of the noisy and PGD inputs and, unless ``penalty_eps`` is given, the penalty's;
        ``double_backward`` as :func:`natgrad.gradients.input_gradient`'s."""
        super().__init__(model)
        self.double_backward = double_backward
        self.penalty_eps = eps if penalty_eps is None else penalty_eps
        self.eps, self.ce_weight, self.gn_weight, self.warmup_epochs = eps, ce_weight, gn_weight, warmup_epochs
        self.norm, self.input_noise = norm, input_noise
        self.channel_weights = (None if channel_weights is None
                                else torch.tensor(list(channel_weights), dtype=torch.float32))
        self.noise_std = eps if noise_std is None else noise_std
        self.attack_steps, self.attack_random_start = attack_steps, bool(attack_random_start)
        self.attack_step_size = 2 * eps / attack_steps if attack_step_size is None else attack_step_size

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The input the loss is taken at: ``x`` itself, or a noisy or adversarial version in [0, 1]."""
        if self.input_noise == "none":
            return x
        if self.input_noise == "pgd":
            return pgd(self.model, x, y, self.eps, self.attack_steps, self.attack_step_size, self.attack_random_start)
        if self.input_noise == "gaussian":
            noise = torch.randn_like(x) * self.noise_std
        else:
            noise = torch.empty_like(x).uniform_(-self.eps, self.eps)
        return (x + noise).clamp_(0.0, 1.0)

    def penalty(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-image ``penalty_eps * ||c * grad||``."""
        if self.channel_weights is not None:
            if len(self.channel_weights) != grad.shape[1]:
                raise UserError(f"channel_weights has {len(self.channel_weights)} entries for {grad.shape[1]}-channel "
                                "images; give one weight per channel")
            grad = grad * self.channel_weights.to(grad.device, grad.dtype).view(-1, 1, 1)
        flat = grad.flatten(1)
        return self.penalty_eps * (flat.abs().sum(1) if self.norm == "l1" else flat.norm(dim=1))

    def weight(self, epoch_fraction: float) -> float:
        return self.gn_weight * linear_warmup(epoch_fraction, self.warmup_epochs)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, mean cross-entropy and mean penalty at ``x``, by double backprop."""
        logits, ce, grad = input_gradient(self.loss_model, x, y, create_graph=True,
                                          double_backward=self.double_backward)
        return logits, ce.mean(), self.penalty(grad).mean()

    def compiled_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`terms` with the input gradient by ``torch.func.grad``, which ``torch.compile`` traces into one
        graph: the double backward becomes that graph's ordinary backward."""
        logits, grad = func_input_gradient(self.loss_model, x, y)
        return logits, per_sample_ce(logits, y).mean(), self.penalty(grad).mean()

    def compile(self) -> None:
        compiled = compiled_with_input_gradient(self.compiled_terms, self.model, "gradnorm")
        self.terms = compiled  # type: ignore[method-assign,assignment]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        x = self.perturb(x, y)
        logits, ce, reg = self.terms(x, y)
        weight = self.weight(epoch_fraction)  # outside the compiled graph: a changing float would recompile it
        loss = self.ce_weight * ce + weight * reg
        return {"loss": loss, "logits": logits, "ce": ce.item(), "reg": reg.item(), "gn_weight": weight}


# gradnorm-fd's default step, penalty_eps / divisor (scripts/fd_error.py and docs/RESULTS.md, issue 19): in
# float32 small; under autocast large enough for bf16's rounding, and for the forward scheme no larger than
# Fashion-MNIST training stayed stable with (eps / 2 diverged there, eps / 4 did not)
FD_STEP_DIVISORS: dict[tuple[FDScheme, FDPrecision], int] = {
    ("forward", "float32"): 32, ("central", "float32"): 8, ("forward", "autocast"): 4, ("central", "autocast"): 2,
}


class GradNormFD(GradNorm):
    """The same objective, its parameter gradient estimated by a finite difference: no double backprop.

    With ``d_i = d penalty_i / d g_i`` held fixed (``eps * sign(g_i)`` for L1), the penalty's
    parameter gradient is the derivative of ``grad_theta L_i`` along ``d_i``, with
    ``t = fd_step / max_i ||d_i||_inf`` (every image moves by at most ``fd_step`` per pixel):

    - ``forward`` (default): ``(grad_theta L_i(x_i + t d_i) - grad_theta L_i(x_i)) / t``, error of order ``t``
      (the loss's third derivatives); two forward and two backward passes.
    - ``central``: ``(grad_theta L_i(x_i + t d_i) - grad_theta L_i(x_i - t d_i)) / 2t``, error of order ``t^2``.
      The cross-entropy's gradient is the two points' mean (also ``O(t^2)`` from the gradient at ``x``), so
      the pass at ``x`` takes the input gradient only: three forward and three backward passes, one of them
      without weight gradients.

    ``fd_precision``: ``float32`` runs the passes in float32 even under autocast, since at bf16's
    resolution (about 0.004 near 1) a small step is lost in rounding; ``autocast`` keeps the caller's
    autocast (bf16's speed) and needs a step large enough to survive its rounding. The default step is
    ``penalty_eps`` divided by ``FD_STEP_DIVISORS[(scheme, precision)]`` (docs/RESULTS.md, issue 19, has
    the measured errors).

    The error grows with the model's curvature: small for smooth (GradNorm-trained or freshly initialized)
    models, large for a naturally trained one unless ``fd_step`` is small (docs/RESULTS.md). The shifted
    points are not clipped to [0, 1]: they probe the function, they are not images. Passes but the last run
    on the unwrapped model, the last through ``loss_model``; one graph is kept at a time and any attention
    kernel works. Dropout and drop-path draw the same masks in every pass; BatchNorm in train mode sees (and
    counts in its running statistics) every pass's batch.
    """

    compile = Objective.compile  # the model: no input gradient's graph to compile

    def __init__(self, model: nn.Module, eps: float, fd_step: float | None = None, fd_scheme: FDScheme = "forward",
                 fd_precision: FDPrecision = "float32", **gradnorm_params):
        super().__init__(model, eps, **gradnorm_params)
        self.fd_scheme, self.fd_precision = fd_scheme, fd_precision
        divisor = FD_STEP_DIVISORS[(fd_scheme, fd_precision)]
        self.fd_step = self.penalty_eps / divisor if fd_step is None else fd_step
        if self.fd_step <= 0:
            raise UserError(f"fd_step={self.fd_step} must be positive (a finite-difference step in pixel units)")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float = 0.0) -> dict:
        if self.fd_precision == "autocast":
            return self._step(x, y, epoch_fraction)
        with torch.autocast(x.device.type, enabled=False):
            return self._step(x, y, epoch_fraction)

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch_fraction: float) -> dict:
        x = self.perturb(x, y).detach()
        params = [p for p in self.model.parameters() if p.requires_grad]
        rng = _rng_state(x.device)
        x1 = x.clone().requires_grad_(True)
        logits = self.model(x1)
        ce = per_sample_ce(logits, y)
        forward = self.fd_scheme == "forward"  # which takes grad_theta L(x) here; central does not need it
        grad, *param_grads = torch.autograd.grad(ce.sum(), [x1, *params] if forward else [x1], allow_unused=True)
        with torch.enable_grad():
            g = grad.detach().float().requires_grad_(True)
            penalty = self.penalty(g)
            (direction,) = torch.autograd.grad(penalty.sum(), g)
        reg = penalty.detach().mean()
        weight = self.weight(epoch_fraction)
        n = len(x)
        mean_ce = ce.detach().mean()
        value = self.ce_weight * mean_ce + weight * reg
        t = self.fd_step / direction.abs().amax().clamp_min(1e-30)
        step = t * direction

        def loss_at(module: nn.Module, shifted: torch.Tensor) -> torch.Tensor:
            """``sum_i L_i(shifted)`` through ``module``, with the first pass's dropout masks."""
            _set_rng_state(x.device, rng)
            return per_sample_ce(module(shifted.to(x.dtype)), y).sum()

        if forward:
            coef: float | torch.Tensor = self.ce_weight / n  # on grad_theta sum_i L_i(x), already computed
            surrogate = torch.zeros((), device=x.device)
            # Under DDP the backward must follow a forward of the wrapped module, even when the penalty is off.
            if weight > 0 or self.loss_model is not self.model:
                coef = coef - weight / (n * t)
                surrogate = loss_at(self.loss_model, x + step) * (weight / (n * t))
        else:
            param_grads = list(torch.autograd.grad(loss_at(self.model, x + step), params, allow_unused=True))
            half_ce, half_fd = self.ce_weight / (2 * n), weight / (2 * n * t)
            coef = half_ce + half_fd  # on grad_theta sum_i L_i(x + t d)
            surrogate = loss_at(self.loss_model, x - step) * (half_ce - half_fd)
        # a term linear in the parameters whose gradient is coef * the parameter gradients computed above
        for p, pg in zip(params, param_grads):
            if pg is not None:
                surrogate = surrogate + (p * (pg * coef).to(p.dtype)).sum()
        loss = surrogate - surrogate.detach() + value
        return {"loss": loss, "logits": logits.detach(), "ce": mean_ce.item(), "reg": reg.item(), "gn_weight": weight}


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
