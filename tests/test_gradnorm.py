"""GradNorm (Eq. 2) against independent computations."""

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


def test_gradnorm_runs_on_timm_vit():
    # timm's ViT uses fused scaled-dot-product attention, which has no double backward on CPU.
    model = models.create("vit_tiny_patch16_224", 10, img_size=32, patch_size=8, depth=2)
    assert any(getattr(m, "fused_attn", False) for m in model.modules())
    _gradnorm_step(model, 32)


def test_gradnorm_runs_on_timm_swin():
    model = models.create("swin_tiny_patch4_window7_224", 10, img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32)
    _gradnorm_step(model, 56)


def test_unknown_objective_is_a_user_error():
    import pytest

    from natgrad.errors import UserError

    with pytest.raises(UserError, match="did you mean gradnorm"):
        objectives.create("gradnrom", tiny_net())
