"""Recipes, overrides and validation."""

import pytest

from natgrad import config
from natgrad.errors import UserError


def test_every_recipe_loads_and_validates():
    names = config.list_recipes()
    for stem in ("natural", "gradnorm", "pgd"):
        assert f"fmnist-{stem}" in names and f"imagenet-swinb-{stem}" in names and f"cifar10-prn18-{stem}" in names
    for act in ("relu", "gelu", "silu"):
        for method in ("gradnorm", "pgd"):
            assert f"imagenet-resnet50-{act}-{method}" in names
    for name, description in names.items():
        cfg = config.load(name)
        assert description, name
        assert cfg.method in name


def test_paper_recipes_carry_appendix_g_numbers():
    swin_gn = config.load("imagenet-swinb-gradnorm")
    assert (swin_gn.gradnorm.ce_weight, swin_gn.gradnorm.gn_weight, swin_gn.batch_size) == (0.8, 1.2, 532)
    assert swin_gn.lr == pytest.approx(0.625e-3 * 532 / 512)
    assert swin_gn.optim.warmup_lr == 1e-5 and swin_gn.gradnorm.warmup_epochs == 5
    swin_pgd = config.load("imagenet-swinb-pgd")
    assert swin_pgd.eps == pytest.approx(4 / 255) and swin_pgd.attack.step_size == pytest.approx(8 / 255 / 3)
    assert swin_pgd.ema and swin_pgd.ema_decay == 0.9998 and swin_pgd.aug.mixup == 0.8 and swin_pgd.aug.smoothing == 0.1
    r50 = config.load("imagenet-resnet50-relu-gradnorm")
    assert (r50.epochs, r50.batch_size, r50.model.act, r50.model.train_mode) == (50, 256, "relu", "eval")
    assert r50.init == "stage:imagenet-resnet50-relu-natural" and r50.model.name == "resnet50.a1_in1k"
    swap = config.load("imagenet-resnet50-silu-natural")  # Section 4.2: pretrained, activations swapped, 3 epochs
    assert (swap.method, swap.epochs, swap.model.act, swap.model.pretrained, swap.init) == ("natural", 3, "silu",
                                                                                           True, None)
    assert (r50.gradnorm.ce_weight, r50.gradnorm.gn_weight) == (0.5, 0.5)
    assert r50.lr == pytest.approx(1.25e-3 * 256 / 512)
    cifar = config.load("cifar10-prn18-gradnorm")
    assert cifar.eps == pytest.approx(8 / 255) and cifar.epochs == 300
    # the released code's settings (configs_cifar/*.yaml): fine-tuned from the natural model in eval mode, the
    # penalty at 4/255, GradNorm clipped at 1.0, global batch 256 at lrb 1.25e-3
    assert cifar.init == "stage:cifar10-prn18-natural" and cifar.model.train_mode == "eval"
    assert cifar.gradnorm.eps == pytest.approx(4 / 255) and cifar.optim.clip_grad == 1.0
    assert (cifar.batch_size, cifar.lr) == (256, pytest.approx(1.25e-3 * 256 / 512))
    assert config.load("cifar10-prn18-pgd").optim.clip_grad is None
    natural = config.load("cifar10-prn18-natural")
    assert (natural.epochs, natural.ema, natural.init, natural.model.train_mode) == (50, False, None, "eval")


def test_overrides_and_fractions():
    cfg = config.load("fmnist-gradnorm", ["eps=4/255", "model.act=silu", "data.limit_train=100",
                                          "gradnorm.gn_weight=1.4"])
    assert cfg.eps == pytest.approx(4 / 255) and cfg.model.act == "silu"
    assert cfg.data.limit_train == 100 and cfg.gradnorm.gn_weight == 1.4
    # a key's last part is enough where only one key ends with it (the paper's "gn_weight=1.4")
    short = config.load("fmnist-gradnorm", ["gn_weight=1.4", "tau=0.3", "fd_step=0.01"])
    assert (short.gradnorm.gn_weight, short.edge.tau, short.gradnorm.fd_step) == (1.4, 0.3, 0.01)


@pytest.mark.parametrize("override,message", [
    ("epochz=3", "did you mean epochs"),
    ("gn_wieght=1.4", "did you mean gradnorm.gn_weight"),
    ("warmup_epochs=1", "ambiguous; write one of optim.warmup_epochs, gradnorm.warmup_epochs, attack.warmup_epochs"),
    ("eps=-0.1", "outside [0, 1]"),
    ("eps=2", "outside [0, 1]"),
    ("epochs=0", "at least 1"),
    ("epochs=two", "not a valid int"),
    ("method=gradnrom", "did you mean gradnorm"),
    ("data.limit_train=0", "at least 1"),
    ("notakey", "key=value"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load("fmnist-natural", [override])


def test_unknown_recipe_suggests_closest():
    with pytest.raises(UserError, match="did you mean fmnist-gradnorm"):
        config.load("fmnist-gradnrom")


def test_yaml_recipe_file_with_inherit(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: fmnist-pgd\nepochs: 2\nattack: {steps: 5}\n")
    cfg = config.load(str(path))
    assert (cfg.method, cfg.epochs, cfg.attack.steps, cfg.model.name) == ("pgd", 2, 5, "cnn-small")


def test_differences_ignores_resume_free_keys():
    a = config.load("fmnist-natural")
    b = config.load("fmnist-natural", ["stop_after=1", "data.num_workers=2"])
    c = config.load("fmnist-natural", ["lr=0.1"])
    assert config.differences(a, b) == []
    assert config.differences(a, c) == ["lr: 0.002 -> 0.1"]
