"""PGD: inside the ball and [0, 1], raises the loss, eval mode restored, parameters untouched."""

import pytest
import torch
import torch.nn.functional as F

from natgrad import models, objectives
from natgrad.attacks import pgd


def _model():
    torch.manual_seed(0)
    return models.create("preact-resnet18", 10, in_chans=3, act="gelu")


def test_pgd_stays_in_ball_and_box_and_raises_loss():
    model = _model().eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    x[0] = 0.0  # corners of the box
    x[1] = 1.0
    eps = 8 / 255
    x_adv = pgd(model, x, y, eps, steps=5)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_pgd_restores_train_mode_and_leaves_no_parameter_gradients():
    model = _model().train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    pgd(model, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), 0.03, steps=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(bn.running_mean, before), "the attack must run in eval mode"


def test_keep_best_is_at_least_as_strong_per_image():
    model = _model().eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    last = pgd(model, x, y, 8 / 255, steps=4, step_size=4 / 255)
    torch.manual_seed(1)
    best = pgd(model, x, y, 8 / 255, steps=4, step_size=4 / 255, keep_best=True)
    with torch.no_grad():
        l_last = F.cross_entropy(model(last), y, reduction="none")
        l_best = F.cross_entropy(model(best), y, reduction="none")
        wrong_last = model(last).argmax(1) != y
        wrong_best = model(best).argmax(1) != y
    assert (wrong_best | ~wrong_last).all(), "an image fooled by the last iterate stays fooled"
    assert ((l_best >= l_last - 1e-5) | wrong_best).all()


def test_pgd_training_objective_attacks_in_eval_mode_with_warmup():
    model = _model().train()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective = objectives.create("pgd", model, eps=8 / 255, warmup_epochs=2)
    out = objective(x, y, epoch_fraction=1.0)
    assert abs(out["attack_step"] - (2 * 8 / 255 / 3) * 0.5) < 1e-12
    out["loss"].backward()
    assert model.training
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fgsm_is_one_step_of_1_25_eps_from_a_uniform_start_inside_ball_and_box():
    from natgrad.attacks import fgsm

    model = _model().eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    x[0], x[1] = 0.0, 1.0
    eps = 8 / 255
    torch.manual_seed(5)
    x_adv = fgsm(model, x, y, eps)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # independently (Wong et al. 2020, Algorithm 3): delta ~ U(-eps, eps), x + delta in [0, 1],
    # delta += 1.25 eps sign(grad), projected to the ball and the box
    torch.manual_seed(5)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    delta = (start.detach() + 1.25 * eps * g.sign() - x).clamp(-eps, eps)
    torch.testing.assert_close(x_adv, (x + delta).clamp(0, 1))
    assert (x_adv - x).abs().amax((1, 2, 3)).min() > 0.99 * eps, "a 1.25 eps step reaches the ball's surface"


def test_fgsm_training_uses_fgsm_examples():
    model = _model().eval()  # BatchNorm statistics fixed, so that both attacks see the same model
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    objective = objectives.create("fgsm", model, eps=8 / 255)
    assert objective.steps == 1 and objective.random_start and objective.step_size == pytest.approx(1.25 * 8 / 255)
    torch.manual_seed(2)
    out = objective(x, y)
    from natgrad.attacks import fgsm

    torch.manual_seed(2)
    x_adv = fgsm(model, x, y, 8 / 255)
    assert out["ce"] == pytest.approx(F.cross_entropy(model(x_adv), y).item(), abs=1e-5)
    assert out["ce"] > F.cross_entropy(model(x), y).item()


def _tiny():
    torch.manual_seed(0)
    return models.create("cnn-small", 10, in_chans=1).eval()


def _batch(n=16):
    torch.manual_seed(3)
    x, y = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
    x[0], x[1] = 0.0, 1.0
    return x, y


def test_l2_direction_stays_in_ball_and_box_and_raises_loss():
    model = _tiny()
    x, y = _batch()
    eps = 0.1
    x_adv = pgd(model, x, y, eps, steps=5, direction="l2")
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_l2_direction_one_step_matches_an_independent_computation():
    model = _tiny()
    x, y = _batch()
    eps, step = 0.1, 0.03
    torch.manual_seed(7)
    x_adv = pgd(model, x, y, eps, steps=1, step_size=step, direction="l2")
    torch.manual_seed(7)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1).requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    g_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    moved = start.detach() + step * (28 * 28) ** 0.5 * g / g_norm
    expected = torch.minimum(torch.maximum(moved, x - eps), x + eps).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)


def _strength(model, x_adv, y):
    with torch.no_grad():
        logits = model(x_adv)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y


def test_restarts_are_at_least_as_strong_per_image_and_stay_in_ball_and_box():
    model = _tiny()
    x, y = _batch()
    eps = 0.1
    for keep_best in (False, True):
        torch.manual_seed(1)
        one = pgd(model, x, y, eps, steps=3, keep_best=keep_best)
        torch.manual_seed(1)  # the same first start
        three = pgd(model, x, y, eps, steps=3, keep_best=keep_best, restarts=3)
        assert (three - x).abs().max() <= eps + 1e-6
        assert three.min() >= 0 and three.max() <= 1
        l_one, wrong_one = _strength(model, one, y)
        l_three, wrong_three = _strength(model, three, y)
        assert (wrong_three | ~wrong_one).all(), "an image fooled by one run stays fooled"
        assert ((l_three >= l_one - 1e-5) | wrong_three).all()


def test_restarts_pick_the_strongest_start_per_image():
    model = _tiny()
    x, y = _batch()
    eps = 0.1
    torch.manual_seed(4)
    picked = pgd(model, x, y, eps, steps=0, restarts=3)
    torch.manual_seed(4)
    starts = torch.stack([(x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) for _ in range(3)])
    losses, wrong = zip(*(_strength(model, s, y) for s in starts))
    losses, wrong = torch.stack(losses), torch.stack(wrong)
    # misclassified first, then highest loss; ties go to the earliest start
    best = (wrong * (losses.max() - losses.min() + 1) + losses).argmax(0)
    assert not torch.equal(best, torch.zeros_like(best)), "some image should prefer a later start"
    assert torch.equal(picked, starts[best, torch.arange(len(x))])


def test_bad_direction_or_restarts_is_a_user_error():
    from natgrad.errors import UserError

    model = _tiny()
    x, y = _batch(2)
    with pytest.raises(UserError, match="sign, l2"):
        pgd(model, x, y, 0.1, steps=1, direction="l1")
    with pytest.raises(UserError, match="restarts"):
        pgd(model, x, y, 0.1, steps=1, restarts=0)


def test_pgd_training_in_the_authors_form_attacks_as_keep_best_from_a_random_start():
    """attack.form=code: the same images as natgrad's PGD with a random start and the strongest iterate; the
    weight gradients it takes at each step are dropped, so the step's gradient is the loss's alone."""
    from natgrad import config
    from natgrad.build import build_objective
    from natgrad.errors import UserError

    torch.manual_seed(0)
    model = models.create("cnn-small", 10, 1)
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    objective = build_objective(config.load("fmnist-pgd", ["attack.form=code", "attack.warmup_epochs=0"]), model)
    torch.manual_seed(1)
    result = objective(x, y)
    assert all(p.grad is None for p in model.parameters()), "the attack's weight gradients are not kept"
    torch.manual_seed(1)
    x_adv = pgd(model, x, y, 0.1, 3, step_size=2 * 0.1 / 3, random_start=True, keep_best=True)
    torch.testing.assert_close(result["logits"], model(x_adv))
    with pytest.raises(UserError, match="attack.form=code"):
        config.load("fmnist-gradnorm", ["attack.form=code"])
