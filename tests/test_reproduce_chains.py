"""`natgrad reproduce imagenet` chains its stages as the paper does, end to end on a synthetic ImageFolder."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from conftest import weights, write_image_folder
from natgrad import config, reproduce
from natgrad.errors import UserError
from natgrad.pipeline import PipelineSettings
from natgrad.reproduce import run_reproduce

SMALL = PipelineSettings(epochs=1, limit_train=None, limit_eval=8, n_eval=8, n_sweep=4, sweep_to=2.0, n_autoattack=4,
                         autoattack_batch=4, square_queries=10, pgd_steps=1, n_analysis=4, power_iterations=1,
                         bench_steps=1, bench_warmup=0)


def _image_folder(root: Path) -> None:
    write_image_folder(root, ("n01", "n02"), {"train": 12, "val": 4}, 32)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "net.") -> float:
    return sum((a[prefix + k].float() - b[k].float()).norm().item() for k in b if k.endswith("conv.weight")
               or "conv" in k and k.endswith("weight"))


def test_reproduce_imagenet_chains_pretrained_activation_swap_and_fine_tunes(tmp_path):
    tree = tmp_path / "imagenet"
    _image_folder(tree)
    torch.manual_seed(1)
    pretrained = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=1000).state_dict().items()}
    ckpt = tmp_path / "test_resnet.safetensors"
    save_file(pretrained, str(ckpt))
    torch.manual_seed(2)
    fresh = timm.create_model("test_resnet", num_classes=1000).state_dict()
    overrides = ("data.name=imagenet", f"data.root={tree}", "data.image_size=32", "data.num_workers=0",
                 "data.limit_eval=8", "model.name=test_resnet", f"model.pretrained={ckpt}", "batch_size=8",
                 "eps=0.3", "eval.pgd_steps=1", "eval.batch_size=8", "device=cpu")
    out = tmp_path / "reproduce"
    only = ("resnet50-gelu-gradnorm",)
    results = run_reproduce("imagenet", out, budget="short", overrides=overrides, progress=False, log=lambda _: None,
                            sizes=SMALL, only=only)
    # the experiments asked for and the stages they start from, in the grid's order
    assert [r["model"] for r in results["rows"]] == ["resnet50-gelu-natural", "resnet50-gelu-gradnorm"]

    def config_of(name: str) -> dict:
        return yaml.safe_load((out / name / "config.yaml").read_text())

    for act in ("gelu",):
        swap = config_of(f"resnet50-{act}-natural")  # Section 4.2: the pretrained net, activations swapped
        assert (swap["method"], swap["model"]["act"], swap["model"]["pretrained"], swap["init"]) == (
            "natural", act, str(ckpt), None)
        swapped = weights(out / f"resnet50-{act}-natural")
        assert _distance(swapped, pretrained) < 0.2 * _distance(swapped, fresh)  # it started from the checkpoint
        for method in ("gradnorm",):
            cfg = config_of(f"resnet50-{act}-{method}")
            assert cfg["init"] == str(out / f"resnet50-{act}-natural") and cfg["model"]["act"] == act
            assert cfg["model"]["train_mode"] == "eval"
            tuned = weights(out / f"resnet50-{act}-{method}")
            assert _distance(tuned, {k[4:]: v for k, v in swapped.items() if k.startswith("net.")}) < 0.2 * _distance(
                tuned, fresh)
    # Figure 5's sweep and Table 8's noise fine-tune start from the Swin-B GradNorm model, with their schedules
    grid = {e.name: e for e in reproduce.resolve("imagenet", "full")[1].experiments}
    noise = grid["gradnorm-noise"].config(reproduce.resolve("imagenet", "full")[2], out)
    assert noise.init == str(out / "gradnorm") and noise.gradnorm.input_noise == "uniform" and noise.epochs == 10
    assert grid["gn-weight-1.2"].config(reproduce.resolve("imagenet", "full")[2], out).epochs == 30  # Figure 5
    sweep = grid["gn-weight-1.2"].config(reproduce.resolve("imagenet", "full")[2], out)
    assert sweep.init == str(out / "gradnorm") and sweep.optim.clip_grad == 1.0
    assert (sweep.gradnorm.ce_weight, sweep.gradnorm.gn_weight) == (pytest.approx(0.8), 1.2)
    assert {e.name: e.autoattack_at for e in grid.values()}["gradnorm"] == (0.25, 0.5, 1.0)  # Table 2's eps


@pytest.mark.parametrize("dataset", ["cifar10", "imagenet"])
def test_every_staged_experiment_of_a_grid_starts_from_its_stage(dataset):
    """An experiment whose recipe fine-tunes another recipe's model (``init: stage:RECIPE``) starts from the grid's
    experiment trained with that recipe."""
    experiments = {e.name: e for e in reproduce.resolve(dataset, "full")[1].experiments}
    staged = 0
    for e in experiments.values():
        stage = config.init_stage(config.load(e.recipe))
        if stage is not None:
            staged += 1
            assert e.init is not None and experiments[e.init].recipe == stage, e.name
    assert staged == (2 if dataset == "cifar10" else 10)


def test_only_names_an_experiment_of_the_grid(tmp_path):
    with pytest.raises(UserError, match="no experiment 'resnet50-gelu-gradnrom' .did you mean resnet50-gelu-gradnorm"):
        run_reproduce("imagenet", tmp_path / "r", budget="short", only=("resnet50-gelu-gradnrom",), log=lambda _: None)
    assert not (tmp_path / "r").exists()


def test_reproduce_imagenet_without_internet_stops_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    tree = tmp_path / "imagenet"
    _image_folder(tree)
    with pytest.raises(UserError, match="needs timm's weights for swin_base_patch4_window7_224.ms_in22k_ft_in1k"):
        run_reproduce("imagenet", tmp_path / "r", budget="short", overrides=(f"data.root={tree}",),
                      log=lambda _: None)
    assert not (tmp_path / "r").exists()
