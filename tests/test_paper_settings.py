"""The paper's set-up: pretrained timm starts, eval-mode training, gradient accumulation, staged recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import TINY, assert_same_weights, run_cli, weights
from natgrad import config, evaluation, models
from natgrad.build import build_model, build_objective
from natgrad.engine.train import train
from natgrad.errors import UserError
from natgrad.gradients import input_gradient

RGB = ["data.name=synthetic", "data.channels=3", "data.image_size=32", "data.num_classes=10", "device=cpu"]


def _timm_checkpoint(tmp_path: Path, name: str = "test_resnet") -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    net = timm.create_model(name, num_classes=1000)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return path, state


def test_pretrained_path_gives_its_weights_its_normalization_and_a_reset_classifier(tmp_path):
    path, state = _timm_checkpoint(tmp_path)
    cfg = config.load("fmnist-natural", [*RGB, "model.name=test_resnet", f"model.pretrained={path}"])
    model = build_model(cfg, pretrained=True)
    got = model.net.state_dict()
    classifier = {"fc.weight", "fc.bias"}
    for k, v in state.items():
        if k not in classifier:
            assert torch.equal(got[k], v), k
    assert got["fc.weight"].shape == (10, state["fc.weight"].shape[1])  # reset for 10 classes, as timm does
    pcfg = timm.models.get_pretrained_cfg("test_resnet")
    assert model.normalize.mean.flatten().tolist() == pytest.approx(pcfg.mean)
    assert model.normalize.std.flatten().tolist() == pytest.approx(pcfg.std)  # not the synthetic data's 0.25
    # the same checkpoint with its own 1000 classes loads whole
    same = config.load("fmnist-natural", [*RGB, "data.num_classes=1000", "model.name=test_resnet",
                                          f"model.pretrained={path}"])
    assert_same_weights(build_model(same, pretrained=True).net.state_dict(), state)
    # a build for loading a trained run's weights has the same normalization, without reading the checkpoint
    assert torch.equal(build_model(cfg).normalize.std, model.normalize.std)


def test_pretrained_checkpoint_of_another_architecture_is_one_line(tmp_path):
    path, _ = _timm_checkpoint(tmp_path, "test_vit")
    cfg = config.load("fmnist-natural", [*RGB, "model.name=test_resnet", f"model.pretrained={path}"])
    with pytest.raises(UserError, match="does not fit test_resnet: the checkpoint lacks"):
        build_model(cfg, pretrained=True)


def test_pretrained_true_without_internet_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    out = tmp_path / "run"
    code, err = run_cli(["train", "fmnist-natural", *TINY, "data.channels=3", "model.name=test_resnet",
                         "model.pretrained=true", "--out", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "test_resnet.r160_in1k" in lines[0] and "model.pretrained=PATH" in lines[0]
    assert not out.exists()


def test_pretrained_refused_for_natgrad_nets():
    with pytest.raises(UserError, match="init=RUN_OR_FILE"):
        config.load("fmnist-natural", ["model.pretrained=true"])


def test_eval_train_mode_freezes_batchnorm_and_dropout_and_makes_gradients_per_image():
    cfg = config.load("fmnist-gradnorm", [*RGB, "model.name=test_resnet", "model.train_mode=eval", "model.drop=0.5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:  # statistics of a pretrained net, not the initial 0 / 1
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    objective = build_objective(cfg, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model.train()
    out1, out2 = model(x), model(x)
    assert torch.equal(out1, out2)  # dropout off
    objective(x, y)["loss"].backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed in an eval-mode training step"
    _, _, batch_grad = input_gradient(model, x, y, create_graph=False)
    for i in range(len(x)):
        _, _, single = input_gradient(model, x[i : i + 1], y[i : i + 1], create_graph=False)
        torch.testing.assert_close(batch_grad[i : i + 1], single, rtol=1e-5, atol=1e-8)


def test_train_mode_train_mixes_the_batch():
    """The contrast: with train-mode BatchNorm one image's gradient depends on the others."""
    cfg = config.load("fmnist-gradnorm", [*RGB, "model.name=test_resnet"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, _, batch_grad = input_gradient(model, x, y, create_graph=False)
    _, _, single = input_gradient(model, x[:2], y[:2], create_graph=False)
    assert not torch.allclose(batch_grad[:2], single, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["natural", "gradnorm"])
def test_accumulation_2x64_trains_the_weights_of_batch_128(tmp_path, method):
    common = [*TINY, "batch_size=128", "epochs=1", "data.limit_eval=32", "eval.pgd_steps=0", "data.synthetic_size=512"]
    one = train(config.load(f"fmnist-{method}", common), tmp_path / "one", progress=False)
    two = train(config.load(f"fmnist-{method}", [*common, "accum_steps=2"]), tmp_path / "two", progress=False)
    assert one["steps"] == two["steps"] == 4
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=2e-6)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)


def test_accumulation_splits_an_uneven_batch_and_refuses_too_many_micro_batches(tmp_path):
    common = [*TINY, "epochs=1", "data.limit_eval=32", "eval.pgd_steps=0"]
    one = tmp_path / "one"
    train(config.load("fmnist-natural", [*common, "batch_size=30"]), one, progress=False)
    three = tmp_path / "three"
    train(config.load("fmnist-natural", [*common, "batch_size=30", "accum_steps=4"]), three, progress=False)
    assert_same_weights(weights(one), weights(three), atol=2e-6)  # micro-batches of 8, 8, 7, 7
    with pytest.raises(UserError, match="accum_steps=40 is more than batch_size=30"):
        config.load("fmnist-natural", [*common, "batch_size=30", "accum_steps=40"])


def test_mixup_pairs_decide_the_split(tmp_path):
    cfg = config.load("fmnist-natural", [*TINY, "batch_size=7", "aug.mixup=0.8"])
    with pytest.raises(UserError, match="batch_size=7 is odd: use 6 or 8"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_staged_recipe_asks_for_the_stage_it_fine_tunes(tmp_path):
    cfg = config.load("cifar10-prn18-gradnorm", [*TINY, "data.channels=3"])
    with pytest.raises(UserError, match="recipe cifar10-prn18-natural; train that first"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


PAPER_RECIPES = [r for r in config.list_recipes() if r.startswith(("imagenet-", "cifar10-"))]
CIFAR = ["data.name=synthetic", "data.channels=3", "data.num_classes=10", "device=cpu"]


def _paper_config(recipe: str) -> config.RunConfig:
    return config.load(recipe, CIFAR if recipe.startswith("cifar10-") else [])


def test_every_imagenet_and_cifar10_recipe_resolves_and_names_its_start():
    for recipe in PAPER_RECIPES:
        cfg = _paper_config(recipe)
        stage = config.init_stage(cfg)
        assert stage is None or stage in PAPER_RECIPES, recipe  # a stage that exists
        if recipe.startswith("imagenet-"):  # each names the exact timm weights it starts from
            assert cfg.model.pretrained is True and cfg.model.train_mode == "eval", recipe
            assert cfg.model.name in timm.list_pretrained(cfg.model.name), recipe
        if stage is not None:
            assert _paper_config(stage).model.name == cfg.model.name, recipe


_MODELS = {(c.model.name, c.model.act): r for r in PAPER_RECIPES for c in [_paper_config(r)]}


@pytest.mark.parametrize("recipe", sorted(_MODELS.values()))
def test_every_imagenet_and_cifar10_model_builds(recipe):
    """One recipe per distinct model of those recipes (Swin-B takes seconds to build on a CPU)."""
    cfg = _paper_config(recipe)
    model = build_model(cfg, input_size=cfg.data.image_size)
    size = cfg.data.image_size or 32
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, size, size))
    assert out.shape == (1, 1000 if recipe.startswith("imagenet-") else 10)
    if cfg.model.act:
        assert any(isinstance(m, models.act_layer(cfg.model.act)) for m in model.modules())


SYNTH_RGB = ["data.name=synthetic", "data.channels=3", "data.image_size=32", "data.num_classes=10",
             "data.synthetic_size=160"]


def test_eval_and_analyze_take_a_timm_name_with_a_local_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    net = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    out = tmp_path / "eval.json"
    code, err = run_cli(["eval", "test_resnet", f"model.pretrained={path}", *SYNTH_RGB, "--recipe", "fmnist-natural",
                         "--attacks", "clean", "--n", "32", "--device", "cpu", "--quiet", "--json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["model"] == "test_resnet" and report["weights"] == str(path)
    # the accuracy of the checkpoint itself, computed here without natgrad's loading
    cfg = config.load("fmnist-natural", SYNTH_RGB)
    ds = evaluation.eval_dataset(cfg, 32)
    x = torch.stack([ds[i][0] for i in range(32)])
    y = torch.tensor([int(ds[i][1]) for i in range(32)])
    pcfg = timm.models.get_pretrained_cfg("test_resnet")
    mean, std = torch.tensor(pcfg.mean).view(1, 3, 1, 1), torch.tensor(pcfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (net.eval()((x - mean) / std).argmax(1) == y).float().mean().item()
    clean = next(r for r in report["results"] if r["attack"] == "clean")
    assert clean["robust_acc"] == pytest.approx(expected) and clean["n"] == 32
    analysis = tmp_path / "analysis"
    code, err = run_cli(["analyze", "test_resnet", f"model.pretrained={path}", *SYNTH_RGB, "--recipe",
                         "fmnist-natural", "--analyses", "gradients", "--n", "16", "--device", "cpu", "--quiet",
                         "--out", str(analysis)], capsys)
    assert code == 0, err
    summary = json.loads((analysis / "analysis.json").read_text())
    assert summary["weights"] == str(path) and summary["weights_sha256"] == report["weights_sha256"]


@pytest.mark.parametrize(("args", "message"), [
    (["test_resnet", *SYNTH_RGB, "--recipe", "fmnist-natural"], "give model.pretrained=true"),
    (["test_resnet", "model.pretrained=CKPT", *SYNTH_RGB, "data.num_classes=7", "--recipe", "fmnist-natural"],
     "classifies 10 classes, the data 7"),
    (["no_such_model_xyz"], "does not exist; give a run folder"),
])
def test_eval_of_a_timm_name_refuses_what_it_cannot_evaluate(tmp_path, capsys, args, message):
    torch.manual_seed(3)
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()},
              str(path))
    args = [a.replace("CKPT", str(path)) for a in args]
    code, err = run_cli(["eval", *args, "--attacks", "clean", "--n", "8", "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
