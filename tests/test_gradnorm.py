"""GradNorm (Eq. 2) against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import models, objectives


def tiny_net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return models.Classifier(net, (0.3,), (0.2,)).to(dtype)


def test_reg_equals_per_image_loop():
    model = models.create("cnn-small", 10, in_chans=1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    eps = 0.1
    out = objectives.create("gradnorm", model, eps=eps, ce_weight=0.8, gn_weight=1.2)(x, y)
    per_image = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        per_image.append(eps * g.abs().sum())
    expected = torch.stack(per_image).mean().item()
    assert abs(out["reg"] - expected) < 1e-5
    ce = F.cross_entropy(model(x), y).item()
    assert abs(out["loss"].item() - (0.8 * ce + 1.2 * expected)) < 1e-5


def test_parameter_gradient_matches_finite_differences_float64():
    model = tiny_net(torch.float64)
    x, y = torch.rand(3, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 2, 1])
    objective = objectives.create("gradnorm", model, eps=0.3, ce_weight=0.5, gn_weight=2.0)
    model.zero_grad()
    objective(x, y)["loss"].backward()
    for name, p in model.named_parameters():
        analytic = p.grad.clone()
        flat, numeric = p.data.view(-1), torch.zeros_like(p).view(-1)
        h = 1e-6
        for j in range(flat.numel()):
            old = flat[j].item()
            flat[j] = old + h
            up = objective(x, y)["loss"].item()
            flat[j] = old - h
            down = objective(x, y)["loss"].item()
            flat[j] = old
            numeric[j] = (up - down) / (2 * h)
        torch.testing.assert_close(analytic, numeric.view_as(p), atol=1e-6, rtol=1e-5, msg=f"gradient of {name}")


def test_warmup_rises_linearly_per_iteration():
    model = tiny_net()
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    objective = objectives.create("gradnorm", model, eps=0.1, gn_weight=1.5, warmup_epochs=2)
    assert objective(x, y, epoch_fraction=0.0)["gn_weight"] == 0.0
    assert abs(objective(x, y, epoch_fraction=0.5)["gn_weight"] - 1.5 * 0.25) < 1e-12
    assert objective(x, y, epoch_fraction=3.0)["gn_weight"] == 1.5


def test_soft_targets_use_soft_cross_entropy():
    model = tiny_net()
    x = torch.rand(4, 1, 6, 6)
    soft = torch.softmax(torch.randn(4, 3), 1)
    out = objectives.create("natural", model)(x, soft)
    expected = -(soft * F.log_softmax(model(x), 1)).sum(1).mean().item()
    assert abs(out["ce"] - expected) < 1e-6


def _gradnorm_step(model: nn.Module, size: int) -> None:
    x, y = torch.rand(2, 3, size, size), torch.randint(0, 10, (2,))
    out = objectives.create("gradnorm", model, eps=4 / 255)(x, y)
    out["loss"].backward()
    assert out["reg"] > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gradnorm_runs_on_timm_vit(monkeypatch):
    # timm's ViT uses fused scaled-dot-product attention, which has no double backward on CPU.
    model = models.create("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=2)
    assert any(getattr(m, "fused_attn", False) for m in model.modules())
    backends = []  # which kernels attention could choose, at each of its calls
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        backends.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                         torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    _gradnorm_step(model, 32)
    assert len(backends) == 2  # one forward through the two blocks: the double backward reuses its graph
    assert set(backends) == {(False, False, True)}, "only the math kernel, which has a double backward, was allowed"


def test_gradnorm_runs_on_timm_swin():
    model = models.create("swin_tiny_patch4_window7_224", 10, img_size=56, depths=(1, 1), num_heads=(2, 4),
                          embed_dim=32)
    _gradnorm_step(model, 56)


def test_unknown_objective_is_a_user_error():
    import pytest

    from natgrad.errors import UserError

    with pytest.raises(UserError, match="did you mean gradnorm"):
        objectives.create("gradnrom", tiny_net())


# ---------------------------------------------------------------------------- options


def rgb_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return models.Classifier(net, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))


def _per_image_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(len(x)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xi), y[i : i + 1]), xi)
        out.append(g[0])
    return torch.stack(out)


def test_unit_channel_weights_equal_plain_gradnorm_exactly():
    model = rgb_net()
    x, y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 1])
    plain = objectives.create("gradnorm", model, eps=0.1, ce_weight=0.8, gn_weight=1.2)(x, y)
    ones = objectives.create("gradnorm", model, eps=0.1, ce_weight=0.8, gn_weight=1.2, channel_weights=[1, 1, 1])(x, y)
    assert ones["reg"] == plain["reg"] and torch.equal(ones["loss"], plain["loss"])
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(plain["loss"], params), torch.autograd.grad(ones["loss"], params)):
        assert torch.equal(a, b)


def test_channel_weights_and_l2_norm_against_a_per_image_loop():
    model = rgb_net()
    x, y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 1])
    g = _per_image_grads(model, x, y)
    c = torch.tensor([1.0, 2.0, 1.0]).view(3, 1, 1)
    green = objectives.create("gradnorm", model, eps=0.1, channel_weights=[1, 2, 1])(x, y)
    assert green["reg"] == pytest.approx(0.1 * (c * g).abs().flatten(1).sum(1).mean().item(), rel=1e-5)
    l2 = objectives.create("gradnorm", model, eps=0.1, norm="l2")(x, y)
    assert l2["reg"] == pytest.approx(0.1 * g.flatten(1).norm(dim=1).mean().item(), rel=1e-5)


def test_input_noise_takes_the_loss_at_the_perturbed_input():
    model = rgb_net()
    x, y = torch.rand(6, 3, 6, 6), torch.tensor([0, 1, 2, 1, 0, 2])
    for kind, bound in (("uniform", 0.05), ("gaussian", None), ("pgd", 0.05)):
        objective = objectives.create("gradnorm", model, eps=0.05, input_noise=kind, noise_std=0.01)
        torch.manual_seed(4)
        x_noisy = objective.perturb(x, y)
        assert x_noisy.min() >= 0 and x_noisy.max() <= 1 and not torch.equal(x_noisy, x)
        if bound is not None:
            assert (x_noisy - x).abs().max() <= bound + 1e-6
        torch.manual_seed(4)
        out = objective(x, y)
        expected = 0.05 * _per_image_grads(model, x_noisy, y).abs().flatten(1).sum(1).mean().item()
        assert out["reg"] == pytest.approx(expected, rel=1e-5), kind
    with torch.no_grad():
        torch.manual_seed(4)
        gauss = objectives.create("gradnorm", model, eps=0.05, input_noise="gaussian", noise_std=0.01).perturb(x, y)
    inside = (x > 0.05) & (x < 0.95)  # away from the clamp
    assert (gauss - x)[inside].std().item() == pytest.approx(0.01, rel=0.15)


# ---------------------------------------------------------------------------- gradnorm-fd


def _param_grad(model: nn.Module, objective, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    objective(x, y)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


class _Counter:
    """Counts forward passes of a model and backward passes through its logits."""

    def __init__(self, model: nn.Module):
        self.forward = self.backward = 0
        model.register_forward_hook(self._on_forward)

    def _on_forward(self, module, inputs, output):
        self.forward += 1
        output.register_hook(self._on_backward)

    def _on_backward(self, grad):
        self.backward += 1


def _fd_case(batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """A GELU cnn-small, a random batch, GradNorm's parameters and its exact parameter gradient."""
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=1, act="gelu")
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    params = {"eps": 0.1, "ce_weight": 0.8, "gn_weight": 1.2}
    return model, x, y, params, _param_grad(model, objectives.create("gradnorm", model, **params), x, y)


def test_fd_gradient_matches_double_backprop_in_two_forward_and_two_backward_passes():
    model, x, y, params, exact = _fd_case(32)
    counter = _Counter(model)
    fd_objective = objectives.create("gradnorm-fd", model, **params)
    out = fd_objective(x, y)
    assert (counter.forward, counter.backward) == (2, 1)
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert (counter.forward, counter.backward) == (2, 2)
    approx = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert F.cosine_similarity(exact, approx, dim=0) >= 0.99
    # the reported value is the objective itself, exactly as double backprop computes it
    reference = objectives.create("gradnorm", model, **params)(x, y)
    assert out["reg"] == pytest.approx(reference["reg"], rel=1e-5)
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-5)


def test_fd_error_shrinks_with_the_step():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=1, act="gelu")
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    exact = _param_grad(model, objectives.create("gradnorm", model, eps=0.1, norm="l2", channel_weights=[3.0]), x, y)
    errors = []
    for h in (0.1, 0.01):
        approx = _param_grad(model, objectives.create("gradnorm-fd", model, eps=0.1, norm="l2", channel_weights=[3.0],
                                                      fd_step=h), x, y)
        errors.append(((approx - exact).norm() / exact.norm()).item())
    assert errors[1] < errors[0] / 3, errors


class _Attention(nn.Module):
    """A tiny attention classifier on 4x4 patches of 8x8 images."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(len(x), 4, 16))
        q = tokens.unsqueeze(1)
        return self.head(F.gelu(F.scaled_dot_product_attention(q, q, q)).mean((1, 2)))


def test_fd_runs_with_fused_attention_kernels_that_have_no_double_backward():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = models.Classifier(_Attention(), (0.5,), (0.25,))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    exact = _param_grad(model, objectives.create("gradnorm", model, eps=0.1), x, y)  # selects the math kernel itself
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        with pytest.raises(RuntimeError, match="not implemented"):  # what double backprop would meet
            xr = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr, create_graph=True)
            g.abs().sum().backward()
        approx = _param_grad(model, objectives.create("gradnorm-fd", model, eps=0.1, fd_step=0.001), x, y)
    assert F.cosine_similarity(exact, approx, dim=0) >= 0.99


def test_fd_uses_the_same_dropout_masks_in_both_passes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, 3))
    model = models.Classifier(net, (0.5,), (0.25,)).train()
    x, y = torch.rand(16, 1, 6, 6), torch.randint(0, 3, (16,))
    torch.manual_seed(7)
    exact = _param_grad(model, objectives.create("gradnorm", model, eps=0.1), x, y)
    torch.manual_seed(7)
    approx = _param_grad(model, objectives.create("gradnorm-fd", model, eps=0.1, fd_step=0.001), x, y)
    assert F.cosine_similarity(exact, approx, dim=0) >= 0.999


def test_fd_skips_the_second_pass_while_the_penalty_weight_is_zero():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=1)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    counter = _Counter(model)
    approx = _param_grad(model, objectives.create("gradnorm-fd", model, eps=0.1, ce_weight=0.8, warmup_epochs=1), x, y)
    assert counter.forward == 1
    exact = torch.autograd.grad(0.8 * F.cross_entropy(model(x), y), list(model.parameters()))
    torch.testing.assert_close(approx, torch.cat([g.flatten() for g in exact]))


def _penalty_error(model: nn.Module, approx: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                   ) -> float:
    """``|approx - exact|`` relative to the penalty's share of the exact gradient."""
    ce = _param_grad(model, objectives.create("natural", model), x, y)
    return ((approx - exact).norm() / (exact - ce).norm()).item()


def test_central_fd_error_shrinks_with_the_square_of_the_step_in_three_passes():
    model, x, y, params, exact = _fd_case(16)
    counter = _Counter(model)
    central = _param_grad(model, objectives.create("gradnorm-fd", model, fd_scheme="central", **params), x, y)
    assert (counter.forward, counter.backward) == (3, 3)
    assert F.cosine_similarity(exact, central, dim=0) >= 0.999
    errors = [_penalty_error(model, _param_grad(model, objectives.create(
        "gradnorm-fd", model, fd_scheme="central", fd_step=h, **params), x, y), exact, x, y) for h in (0.05, 0.025)]
    assert 3 < errors[0] / errors[1] < 5, errors  # second order: halving the step quarters the error


def test_central_fd_under_bf16_autocast_stays_within_tolerance_where_forward_keeps_float32():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=1, act="gelu", train_mode="eval")  # no dropout
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    exact = _param_grad(model, objectives.create("gradnorm", model, eps=0.1), x, y)

    def bf16(objective) -> torch.Tensor:
        """The loss under autocast, its backward outside, as training runs them."""
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(x, y)["loss"]
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    forward = objectives.create("gradnorm-fd", model, eps=0.1)
    torch.testing.assert_close(bf16(forward), _param_grad(model, forward, x, y), rtol=0, atol=0)
    assert _penalty_error(model, bf16(objectives.create("gradnorm", model, eps=0.1)), exact, x, y) < 0.15
    for scheme in ("forward", "central"):  # measured 0.083 and 0.051; exact GradNorm in bf16: 0.045
        autocast = objectives.create("gradnorm-fd", model, eps=0.1, fd_scheme=scheme, fd_precision="autocast")
        in_bf16 = bf16(autocast)
        assert _penalty_error(model, in_bf16, exact, x, y) < 0.15, scheme
        assert not torch.equal(in_bf16, _param_grad(model, autocast, x, y)), "the passes ran in bf16"
