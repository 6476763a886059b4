"""Edge regularization (Section 5.3) against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from natgrad import config, models, objectives
from natgrad.analysis import gaussian_derivative_filters, oriented_energy
from natgrad.errors import UserError
from natgrad.objectives.edge import cosine_loss, sample_classes


def test_filters_are_derivatives_of_a_gaussian():
    g_u, g_v = gaussian_derivative_filters(1.5, dtype=torch.float64)
    ramp = torch.arange(30.0, dtype=torch.float64).expand(30, 30)  # x(u, v) = u
    assert F.conv2d(ramp[None, None], g_u[None, None]).allclose(torch.tensor(1.0, dtype=torch.float64))
    assert F.conv2d(ramp[None, None], g_v[None, None]).abs().max() < 1e-12
    torch.testing.assert_close(g_v, g_u.t())
    # separable: a Gaussian (rows) times its derivative (columns), odd in u
    torch.testing.assert_close(g_u, -g_u.flip(1))
    assert torch.linalg.matrix_rank(g_u) == 1


def test_oriented_energy_of_a_vertical_step_edge():
    img = torch.zeros(1, 3, 20, 24)
    img[..., 12:] = 0.8  # a vertical edge between columns 11 and 12
    energy = oriented_energy(img, sigma=1.0)
    assert energy.shape == img.shape
    profile = energy[0, 0, 10]
    assert profile.argmax().item() in (11, 12)
    assert torch.allclose(energy[..., 11], energy[..., 11][0, 0, 0])  # the same all along the edge
    radius = math.ceil(3 * 1.0)
    flat = torch.cat([energy[..., : 12 - radius - 1], energy[..., 12 + radius + 1 :]], -1)
    assert flat.abs().max() < 1e-10, "flat regions, borders included, have zero energy"
    assert torch.all(profile[:11].diff() >= 0) and torch.all(profile[12:].diff() <= 0)


def test_sampled_classes_follow_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    tau, n = 0.5, 20000
    gen = torch.Generator().manual_seed(0)
    draws = sample_classes(logits.expand(n, -1), tau, generator=gen)
    counts = torch.bincount(draws, minlength=5).double()
    expected = n * torch.softmax(logits[0].double() / tau, 0)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = 4
    p_value = 1 - torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), chi2 / 2)
    assert p_value > 0.001, f"chi-square {chi2:.2f}, p={p_value:.2g}"
    # and the temperature matters: tau=1 frequencies are rejected by the same test
    expected_tau1 = n * torch.softmax(logits[0].double(), 0)
    assert ((counts - expected_tau1) ** 2 / expected_tau1).sum() > 100


@pytest.mark.parametrize("mode", ["per_image", "batch"])
def test_cosine_loss_is_0_for_the_teacher_and_2_for_its_negative(mode):
    teacher = torch.rand(4, 3, 8, 8)
    assert cosine_loss(teacher, teacher, mode).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(3 * teacher, teacher, mode).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-teacher, teacher, mode).item() == pytest.approx(2.0, abs=1e-6)


def test_per_image_and_batch_cosine_differ_as_defined():
    s, t = torch.randn(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    per_image = sum(1 - F.cosine_similarity(s[i].flatten(), t[i].flatten(), 0) for i in range(3)) / 3
    batch = 1 - F.cosine_similarity(s.flatten(), t.flatten(), 0)
    assert cosine_loss(s, t, "per_image").item() == pytest.approx(per_image.item(), abs=1e-6)
    assert cosine_loss(s, t, "batch").item() == pytest.approx(batch.item(), abs=1e-6)


def _model():
    torch.manual_seed(0)
    return models.create("cnn-small", 10, in_chans=1)


def test_edge_loss_is_the_cosine_of_the_sampled_class_gradient():
    model = _model()
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    objective = objectives.create("edge", model, weight=2.0, tau=0.5, sigma=1.0)
    torch.manual_seed(3)
    out = objective(x, y)
    # independently: draw the same classes, take each image's class-logit gradient on its own
    torch.manual_seed(3)
    with torch.no_grad():
        t = torch.multinomial(torch.softmax(model(x) / 0.5, 1), 1).squeeze(1)
    losses = []
    for i in range(5):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[0, t[i]], xi)
        losses.append(1 - F.cosine_similarity(g.flatten(), oriented_energy(x[i : i + 1]).flatten(), 0))
    expected = torch.stack(losses).mean().item()
    assert out["edge"] == pytest.approx(expected, abs=1e-5)
    ce = F.cross_entropy(model(x), y).item()
    assert out["loss"].item() == pytest.approx(ce + 2.0 * expected, abs=1e-5)


def test_edge_loss_gradient_reaches_the_parameters():
    model = _model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = objectives.create("edge", model, weight=1.0)(x, y)
    ce_only = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()), retain_graph=True)
    full = torch.autograd.grad(out["loss"], list(model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(ce_only, full)), "the edge term must train the model"


@pytest.mark.parametrize("params", [
    {"student": "loss"}, {"student": "saliency"}, {"teacher": "magnitude", "cosine": "batch"},
])
def test_edge_variants_give_finite_losses_in_range(params):
    model = _model()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    out = objectives.create("edge", model, **params)(x, y)
    assert 0.0 <= out["edge"] <= 2.0 and math.isfinite(out["loss"].item())
    out["loss"].backward()


def test_saliency_student_is_max_abs_over_channels():
    torch.manual_seed(0)
    model = models.create("cnn-small", 10, in_chans=3)
    x, y = torch.rand(2, 3, 28, 28), torch.randint(0, 10, (2,))
    torch.manual_seed(1)
    out = objectives.create("edge", model, student="saliency")(x, y)
    torch.manual_seed(1)
    xr = x.clone().requires_grad_(True)
    logits = model(xr)
    t = torch.multinomial(torch.softmax(logits.detach() / 0.5, 1), 1).squeeze(1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xr)
    saliency = g.abs().amax(1)
    teacher = oriented_energy(x).sum(1)
    expected = (1 - F.cosine_similarity(saliency.flatten(1), teacher.flatten(1), 1)).mean().item()
    assert out["edge"] == pytest.approx(expected, abs=1e-5)


def test_weight_schedule_of_the_authors_code():
    objective = objectives.create("edge", _model(), weight=1.0, weight_per_epoch=0.09, weight_max=19.0)
    assert objective.weight_at(0.0) == 1.0
    assert objective.weight_at(10.7) == pytest.approx(1.9)
    assert objective.weight_at(1000.0) == 19.0


@pytest.mark.parametrize("params,message", [
    ({"tau": 0.0}, "tau=0.0 must be (positive|above 0)"), ({"sigma": -1.0}, "sigma=-1.0 must be (positive|above 0)"),
    ({"student": "saliancy"}, "did you mean saliency"),
])
def test_bad_edge_parameters_are_user_errors(params, message):
    """Checked once, where a config enters (the objective takes its typed arguments on trust)."""
    with pytest.raises(UserError, match=message):
        config.load("fmnist-edge", [f"edge.{k}={v}" for k, v in params.items()])
