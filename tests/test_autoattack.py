"""AutoAttack adapter: consistent accuracies, inside the ball, per-attack breakdown, checks, modes and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from torch import nn

from natgrad.attacks.autoattack import autoattack
from natgrad.errors import UserError

EPS = 0.1


@pytest.fixture(scope="module", autouse=True)
def _threads():
    # Replaces conftest's two threads: tensors this small gain nothing from a second one, and it stalls the
    # attacks' thousands of tiny steps whenever the other core is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one fixed random 8x8 prototype per class."""
    prototypes = torch.rand(classes, 64, generator=torch.Generator().manual_seed(0)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (prototypes[y] + 0.3 * torch.randn(n, 64, generator=g)).clamp(0, 1)
    return x.view(n, 1, 8, 8), y


def _trained(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x, y = _images(512, 1, classes)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


class _AlwaysDropout(nn.Dropout):
    """Dropout that stays active in eval mode: a randomized defense."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, training=True)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _trained()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return _images(64, 2)


@pytest.fixture(scope="module")
def standard(model, data) -> dict:
    return autoattack(model, *data, EPS)


def test_standard_accuracies_agree_with_the_model(model, data, standard):
    x, y = data
    clean = _accuracy(model, x, y)
    assert 0.5 < clean < 1.0
    assert standard["clean_acc"] == clean
    assert standard["robust_acc"] < standard["clean_acc"], "the attacks should succeed somewhere at this eps"
    assert standard["robust_acc"] == _accuracy(model, standard["x_adv"], y)
    assert {k: standard[k] for k in ("attack", "version", "eps", "n")} == {
        "attack": "autoattack", "version": "standard", "eps": EPS, "n": 64}


def test_adversarial_images_stay_in_the_ball_and_the_box(data, standard):
    x, _ = data
    x_adv = standard["x_adv"]
    assert x_adv.shape == x.shape and x_adv.device == x.device and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_per_attack_breakdown_follows_autoattack_order(standard):
    steps = standard["per_attack"]
    assert [s["attack"] for s in steps] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    accs = [standard["clean_acc"]] + [s["robust_acc"] for s in steps]
    assert accs == sorted(accs, reverse=True)
    assert steps[-1]["robust_acc"] == standard["robust_acc"]
    assert standard["warnings"] == []


def test_matches_a_single_autoattack_run(model, data):
    x, y = data
    attacks = ["apgd-ce", "apgd-t"]
    x_ref, y_ref = AutoAttack(model, attacks=attacks, eps=EPS, seed=0, version="custom").run_standard_evaluation(
        x, y, batch_size=20)
    result = autoattack(model, x, y, EPS, version="custom", attacks=attacks, batch_size=20)
    assert torch.equal(result["x_adv"], x_ref)
    assert result["robust_acc"] == (y_ref == y).float().mean().item()


def test_eps_zero_keeps_clean_accuracy(model, data, capsys):
    x, y = data
    result = autoattack(model, x, y, 0.0, version="custom", attacks=["apgd-ce", "square"], verbose=True)
    assert result["attack"] == "autoattack-custom"
    assert result["robust_acc"] == result["clean_acc"] == _accuracy(model, x, y)
    assert torch.equal(result["x_adv"], x)
    out = capsys.readouterr().out
    assert "apgd-ce" in out and "square" in out


@pytest.mark.parametrize("start_training", [True, False])
def test_restores_mode_and_leaves_no_gradients_or_rng_changes(data, start_training):
    model = _trained().train(start_training)
    bn = model[2]
    running_mean = bn.running_mean.clone()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    autoattack(model, *data, EPS, version="custom", attacks=["apgd-ce", "fab"])
    assert torch.equal(torch.rand(3), expected), "the caller's random stream is left alone"
    assert all(m.training == start_training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(bn.running_mean, running_mean), "the attacks must run in eval mode"


def test_randomized_model_is_flagged(model, data, caplog):
    noisy = nn.Sequential(_AlwaysDropout(0.2), model)
    result = autoattack(noisy, *data, EPS, version="custom", attacks=["apgd-ce"])
    assert any("random" in w for w in result["warnings"])
    assert not [r for r in caplog.records if r.name == "auto-attack"], "warnings are returned, not logged"


@pytest.mark.parametrize(("kwargs", "hint"), [
    ({"version": "fast"}, "standard, plus, custom"),
    ({"version": "custom", "attacks": ["apgd-ce", "apgd-xx"]}, "apgd-dlr"),
    ({"version": "custom"}, "square"),
    ({"attacks": ["apgd-ce"]}, "custom"),
    ({"eps": 8}, "[0, 1]"),
    ({"eps": -0.1}, "[0, 1]"),
])
def test_bad_arguments_are_user_errors(model, data, kwargs, hint):
    kwargs = {"eps": EPS, **kwargs}
    with pytest.raises(UserError) as info:
        autoattack(model, *data, **kwargs)
    assert hint in str(info.value) and "\n" not in str(info.value)


def test_fewer_than_ten_classes(data):
    x, y = _images(32, 2, classes=5)
    result = autoattack(_trained(5), x, y, EPS, version="custom", attacks=["apgd-t", "fab-t"])
    assert result["robust_acc"] <= result["clean_acc"]
    with pytest.raises(UserError, match="apgd-t needs at least 4 classes"):
        autoattack(_trained(3), *_images(8, 2, classes=3), EPS)


def _count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, calls: dict[str, int], name: str) -> None:
    original = cls.perturb

    def counted(self, *args, **kwargs):
        calls[name] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "perturb", counted)


def test_interrupted_evaluation_resumes_after_the_last_finished_attack(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    x, y = data
    model = _trained()
    attacks = ["apgd-ce", "apgd-t"]
    reference = autoattack(model, x, y, EPS, version="custom", attacks=attacks)
    state = tmp_path / "aa" / "state.pt"

    with monkeypatch.context() as patch:
        def interrupt(self, *args, **kwargs):
            raise KeyboardInterrupt

        patch.setattr(APGDAttack_targeted, "perturb", interrupt)
        model.train()
        with pytest.raises(KeyboardInterrupt):
            autoattack(model, x, y, EPS, version="custom", attacks=attacks, state_path=state)
    assert model.training, "the mode is restored on an interruption too"
    assert state.exists() and list(state.parent.iterdir()) == [state]
    saved = torch.load(state, weights_only=True)
    assert [s["attack"] for s in saved["per_attack"]] == ["apgd-ce"]

    calls = {"apgd-ce": 0, "apgd-t": 0}
    _count_calls(monkeypatch, APGDAttack, calls, "apgd-ce")
    _count_calls(monkeypatch, APGDAttack_targeted, calls, "apgd-t")
    resumed = autoattack(model, x, y, EPS, version="custom", attacks=attacks, state_path=str(state))
    assert calls["apgd-ce"] == 0 and calls["apgd-t"] > 0
    assert model.training
    for result in (resumed, autoattack(model, x, y, EPS, version="custom", attacks=attacks, state_path=state)):
        assert result["per_attack"] == reference["per_attack"]
        assert result["robust_acc"] == reference["robust_acc"]
        assert torch.equal(result["x_adv"], reference["x_adv"])
    assert calls == {"apgd-ce": 0, "apgd-t": 1}, "a finished state is returned without attacking"

    with pytest.raises(UserError, match="eps"):
        autoattack(model, x, y, EPS / 2, version="custom", attacks=attacks, state_path=state)


def test_square_check_applies_autoattacks_threshold_to_a_whole_breakdown():
    from natgrad.attacks.autoattack import SQUARE_FLAG, square_warnings

    def breakdown(square):
        return [{"attack": "apgd-ce", "robust_acc": 0.600}, {"attack": "square", "robust_acc": square}]

    assert square_warnings(0.9, breakdown(0.599)) == []  # 0.1 points: below the 0.2-point threshold
    (flag,) = square_warnings(0.9, breakdown(0.590))
    assert flag.startswith(SQUARE_FLAG) and "1.00%" in flag
