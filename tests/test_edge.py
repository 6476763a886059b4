"""Edge regularization (Section 5.3) against independent computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from natgrad import build, config, models, objectives
from natgrad.analysis import gaussian_derivative_filters, oriented_energy
from natgrad.analysis.edges import contour_energy
from natgrad.errors import UserError
from natgrad.objectives import edge as edge_module
from natgrad.objectives.edge import cosine_loss, normalized_mse, sample_classes


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


def test_paper_weight_schedule_counts_finished_epochs():
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


# ---------------------------------------------------------------------------- form=code, the authors' released code
# An independent reading of adversarial_training_logit.py (the contourtrain branch of train_one_epoch) and
# gradient_teachers.py (ContourEnergy, make_gaussian_filter, make_sobel_kernel), in plain torch.


def _bessel_gaussian_t1() -> torch.Tensor:
    """make_gaussian_filter(1.0): exp(-1) I_n(1) for n = -3..3, normalized; I_2, I_3 by the Bessel recurrence."""
    t = torch.tensor(1.0, dtype=torch.float64)
    i0, i1 = torch.special.modified_bessel_i0(t), torch.special.modified_bessel_i1(t)
    i2 = i0 - 2 * i1  # I_{n+1}(t) = I_{n-1}(t) - (2n / t) I_n(t)
    i3 = i1 - 4 * i2
    h = torch.exp(-t) * torch.stack([i3, i2, i1, i0, i1, i2, i3])
    return (h / h.sum()).float()


def _sobel_k3() -> torch.Tensor:
    """make_sobel_kernel(3): x / (x^2 + y^2) on a 3x3 grid, the x = 0 column's denominator set to 1."""
    r = torch.linspace(-1, 1, 3, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    den = x**2 + y**2
    den[:, 1] = 1
    return (x / den).float()


def _code_teacher(img: torch.Tensor) -> torch.Tensor:
    """ContourEnergy(sigma=1, k_sobel=3).forward(img) without dz."""
    c = img.shape[1]
    g, sob = _bessel_gaussian_t1(), _sobel_k3()
    p = (g.numel() - 1) // 2
    img = F.pad(img, (p, p, p, p), "reflect")
    img = F.conv2d(img, g[None, None, :, None].expand(c, -1, -1, -1), groups=c)
    img = F.conv2d(img, g[None, None, None, :].expand(c, -1, -1, -1), groups=c)
    img = F.pad(img, (1, 1, 1, 1), "reflect")
    dx = F.conv2d(img, sob[None, None].expand(c, -1, -1, -1), groups=c)
    dy = F.conv2d(img, sob.T[None, None].expand(c, -1, -1, -1), groups=c)
    e = (dx**2 + dy**2).sum(-3, keepdim=True) ** 0.5
    e = F.pad(e, (p, p, p, p), "reflect")
    e = F.conv2d(e, g[None, None, :, None])
    e = F.conv2d(e, g[None, None, None, :])
    return e.expand(-1, c, -1, -1)


def _code_alpha(alpha: tuple[float, float, float], epoch: int, batch_idx: int, n_batches: int, accum: int) -> float:
    return min(alpha[0] + (epoch + (batch_idx // accum) / (n_batches / accum)) * alpha[1], alpha[2])


def _code_loss(model, x, y, t, student: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The code's ``(loss_class, loss_gradient)``; its models see normalized images, so ``input`` is the
    normalized batch (a leaf)."""
    norm = model.normalize
    z = ((x - norm.mean) / norm.std).detach().requires_grad_(True)
    output = model.net(z)
    loss_class = F.cross_entropy(output, y)
    if student == "loss":  # adversarial_training_logit_loss.py
        gradient = torch.autograd.grad(loss_class, z, create_graph=True, retain_graph=True)[0]
    else:
        v = (output * F.one_hot(t, output.shape[1]).float()).sum(-1)
        gradient = torch.autograd.grad(v.sum(), z, create_graph=True, retain_graph=True)[0]
    if student == "saliency":
        gradient = gradient.abs().max(1, keepdim=True).values
    gradient = gradient / gradient.square().mean() ** 0.5
    with torch.no_grad():
        ref = _code_teacher(z)
        if student == "saliency":
            ref = ref[:, 0:1, :, :]
        ref = ref / ref.square().mean() ** 0.5
    return loss_class, F.mse_loss(gradient, ref)


def test_contour_energy_is_the_codes_teacher():
    x = torch.rand(2, 3, 20, 24)
    torch.testing.assert_close(contour_energy(x, 1.0), _code_teacher(x), rtol=1e-5, atol=1e-6)


def test_normalized_mse_is_twice_the_batch_cosine_loss():
    s, t = torch.randn(3, 2, 5, 5), torch.rand(3, 2, 5, 5)
    assert normalized_mse(s, t).item() == pytest.approx(2 * cosine_loss(s, t, "batch").item(), abs=1e-5)


@pytest.mark.parametrize("student", ["class", "saliency", "loss"])
def test_code_form_is_the_authors_loss(student, monkeypatch):
    torch.manual_seed(0)
    # channel statistics far apart, so that the normalized space (where the code works) matters
    model = models.create("cnn-small", 10, in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.1, 0.4, 0.2))
    x, y = torch.rand(6, 3, 28, 28), torch.randint(0, 10, (6,))
    t = torch.tensor([3, 0, 7, 7, 1, 9])

    def fixed(logits: torch.Tensor, tau: float, generator=None) -> torch.Tensor:
        assert tau == 0.5 and logits.shape == (6, 10)
        return t

    monkeypatch.setattr(edge_module, "sample_classes", fixed)
    epoch, batch_idx, n_batches, accum = 3, 251, 1000, 2  # the code's iteration counter, as natgrad counts steps
    fraction = epoch + (batch_idx // accum) / (n_batches // accum)
    objective = objectives.create("edge", model, form="code", weight=1.0, weight_per_epoch=0.09, weight_max=19.0,
                                  tau=0.5, sigma=1.0, student=student)
    out = objective(x, y, epoch_fraction=fraction)
    alpha = _code_alpha((1.0, 0.09, 19.0), epoch, batch_idx, n_batches, accum)
    assert out["edge_weight"] == pytest.approx(alpha, rel=1e-12)
    ce, mse = _code_loss(model, x, y, t, student)
    expected = ce + alpha * mse
    assert out["ce"] == pytest.approx(ce.item(), rel=1e-6)
    assert out["edge"] == pytest.approx(mse.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    params = list(model.parameters())
    ours = torch.autograd.grad(out["loss"], params)
    theirs = torch.autograd.grad(expected, params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_code_form_weight_grows_per_iteration():
    objective = objectives.create("edge", _model(), form="code", weight=1.0, weight_per_epoch=0.09, weight_max=19.0)
    for fraction, expected in [(0.0, 1.0), (0.5, 1.045), (1.0, 1.09), (10.7, 1.963), (199.0, 18.91), (250.0, 19.0)]:
        assert objective.weight_at(fraction) == pytest.approx(expected), fraction
    paper = objectives.create("edge", _model(), weight=1.0, weight_per_epoch=0.09, weight_max=19.0)
    assert paper.weight_at(0.5) == 1.0 and paper.weight_at(10.7) == pytest.approx(1.9)


def test_edge_form_is_a_config_choice():
    cfg = config.load("fmnist-edge", ["edge.form=code", "edge.weight_per_epoch=0.09", "edge.weight_max=19"])
    assert cfg.edge.form == "code"
    objective = build.build_objective(cfg, _model())
    assert objective.form == "code" and objective.weight_at(2.5) == pytest.approx(4.0 + 0.09 * 2.5)
    assert config.load("fmnist-edge").edge.form == "paper"


@pytest.mark.parametrize("overrides,message", [
    (["edge.form=cod"], r"edge.form='cod' is not one of paper, code \(did you mean code\?\)"),
    (["edge.form=code", "edge.teacher=magnitude"],
     "edge.teacher=magnitude does not apply with edge.form=code .*set edge.teacher=energy .* or edge.form=paper"),
    (["edge.form=code", "edge.cosine=batch"],
     "edge.cosine=batch does not apply with edge.form=code .*set edge.cosine=per_image"),
    (["edge.form=code", "edge.sigma=9.5"], "edge.sigma=9.5 blurs 29 pixels, too wide for 28-pixel images"),
])
def test_bad_edge_form_settings_are_one_line_user_errors(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        config.load("fmnist-edge", overrides)
    assert "\n" not in str(err.value)
