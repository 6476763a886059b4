"""The paper's analyses against independent computations, and `natgrad analyze`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY, run_cli
from natgrad.analysis import statistics as st
from natgrad.analysis.analyze import ANALYSES, AnalysisSettings, analyze
from natgrad.analysis.edges import log_correlation, sobel_energy
from natgrad.analysis.geometry import (
    hessian_spectral_norm,
    local_linearity_error,
    normalized_curvature,
)
from natgrad.engine.distributed import Context, batch_source


def _tiny_conv() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.GELU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 4), nn.Tanh(),
                         nn.Linear(4, 5)).double()


def test_batched_hessian_norm_is_each_images_largest_eigenvalue():
    model = _tiny_conv()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g)

    def loss_fn(z):
        return F.cross_entropy(model(z), y, reduction="none")

    _, grad, norm = hessian_spectral_norm(loss_fn, x, iterations=300, generator=torch.Generator().manual_seed(2))
    for i in range(len(x)):
        def single(xi, i=i):
            return F.cross_entropy(model(xi[None]), y[i:i + 1])

        hessian = torch.autograd.functional.hessian(single, x[i])
        expected = torch.linalg.eigvalsh(hessian.reshape(32, 32)).abs().max()
        assert norm[i].item() == pytest.approx(expected.item(), rel=1e-3)
        single_grad = torch.autograd.functional.jacobian(single, x[i])
        assert torch.allclose(grad[i], single_grad)
    curvature = normalized_curvature(norm, grad)
    assert torch.allclose(curvature, norm / grad.flatten(1).norm(dim=1))


def test_local_linearity_error_is_zero_for_a_linear_loss_and_positive_for_a_curved_one():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 5, 5, generator=g)
    w = torch.randn(3 * 5 * 5, generator=g)
    linear = local_linearity_error(lambda z: z.flatten(1) @ w + 0.5, x, eps=0.1, generator=g)
    assert linear.abs().max().item() < 1e-10
    curved = local_linearity_error(lambda z: (z.flatten(1) ** 2).sum(1), x, eps=0.1, generator=g)
    assert (curved > 0).all()
    # for L = sum z^2 the error is exactly (a (1 - a) ||n1 - n2||^2)^2; check its scale with eps
    bigger = local_linearity_error(lambda z: (z.flatten(1) ** 2).sum(1), x, eps=0.2,
                                   generator=torch.Generator().manual_seed(5))
    smaller = local_linearity_error(lambda z: (z.flatten(1) ** 2).sum(1), x, eps=0.1,
                                    generator=torch.Generator().manual_seed(5))
    assert torch.allclose(bigger, 16 * smaller, rtol=1e-3)


def test_oriented_energy_correlates_perfectly_with_itself_and_sobel_sees_a_ramp():
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    energy = sobel_energy(x)
    assert energy.shape == (3, 12, 12)
    assert torch.allclose(log_correlation(energy, energy, floor_a=1e-3), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(log_correlation(energy, 1 / energy.clamp_min(1e-3), floor_a=1e-3, floor_b=1e-9),
                          -torch.ones(3, dtype=torch.float64))
    ramp = torch.arange(8.0).repeat(1, 1, 8, 1)  # x(u, v) = u, slope 1
    assert torch.allclose(sobel_energy(ramp)[0, 2:-2, 2:-2], torch.full((4, 4), 64.0))  # |8 * slope|^2


def test_histograms_count_every_value_once():
    values = torch.tensor([0.0, 1e-20, 3e-5, 0.5, 2.0, 7.0, math.inf], dtype=torch.float64)
    hist = st.histogram(values)
    assert sum(hist["counts"]) == len(values)
    assert hist["counts"][0] == 1 and hist["counts"][-1] == 1  # the zero and the infinity
    edges = torch.tensor(hist["edges"], dtype=torch.float64)
    for v in values[1:-1]:
        i = next(k for k in range(len(edges) - 1) if edges[k] <= v < edges[k + 1])
        assert hist["counts"][i] >= 1


@pytest.fixture(scope="module")
def analysis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(64, 10))
    g = torch.Generator().manual_seed(3)
    ds = torch.utils.data.TensorDataset(torch.rand(40, 1, 12, 12, generator=g), torch.randint(0, 10, (40,),
                                                                                              generator=g))
    settings = AnalysisSettings(eps=0.05, batch_size=16, power_iterations=3, pictures=4, progress=False)
    return analyze(model, batch_source(ds, settings.seed, Context(0, 1, torch.device("cpu"))), len(ds), settings)


def test_table1_conditional_means_recombine_and_histograms_add_up(analysis):
    summary, arrays = analysis
    g = summary["gradients"]
    rate = g["pgd_success_rate"]
    assert 0 < rate < 1, "this fixture needs both outcomes"
    assert g["l1_mean"] == pytest.approx((1 - rate) * g["l1_mean_attack_fails"] + rate * g["l1_mean_attack_succeeds"])
    assert g["pgd_acc"] == pytest.approx(1 - rate) and g["pgd_acc"] <= g["clean_acc"]
    hists = g["histograms"]
    assert sum(hists["all"]["counts"]) == 40
    assert [a + b for a, b in zip(hists["correct"]["counts"], hists["incorrect"]["counts"])] == hists["all"]["counts"]
    channels = summary["channels"]
    assert sum(channels["all"]["counts"]) == 40 * 12 * 12
    assert arrays["gradients"]["l1"].mean().item() == pytest.approx(g["l1_mean"])


def test_every_analysis_reports_its_image_count(analysis):
    summary, _ = analysis
    assert all(summary[name]["n"] == (4 if name == "pictures" else 40) for name in ANALYSES)
    along = summary["along_attack"]
    assert along["t"][0] == 0 and along["t"][-1] == 2
    assert along["loss"][-1] > along["loss"][0]  # moving along the attack raises the loss
    assert summary["gradients"]["l1_mean"] == pytest.approx(along["grad_l1"][0], rel=1e-5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze") / "run"
    assert run_cli(["train", "fmnist-natural", *TINY, "epochs=1", "--out", str(out), "--quiet"])[0] == 0
    return out


def test_analyze_command_writes_json_and_figures(run):
    assert run_cli(["analyze", str(run), "--n", "20", "--power-iterations", "2", "--quiet"])[0] == 0
    text = (run / "analysis" / "analysis.json").read_text()
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"analysis.json holds {c}, which is not JSON"))
    assert summary["n"] == 20 and summary["model"] == "run" and set(ANALYSES) <= set(summary)
    for name in summary["figures"].values():
        assert (run / "analysis" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(summary["figures"]) == 7


@pytest.mark.parametrize("args,message", [
    (["--n", "0"], "--n 0 must be at least 1"),
    (["--analyses", "gradients,curvatur"], "unknown analysis 'curvatur'"),
])
def test_bad_analyze_input(run, tmp_path, capsys, args, message):
    code, err = run_cli(["analyze", str(run), "--out", str(tmp_path / "a"), *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def test_analyze_refuses_a_folder_without_weights_and_an_out_it_would_clobber(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("method: natural\n")
    code, err = run_cli(["analyze", str(tmp_path / "empty")], capsys)
    assert code == 2 and "no model.safetensors" in err
    code, err = run_cli(["analyze", str(run), "--out", str(run)], capsys)
    assert code == 2 and "not an analysis folder" in err and (run / "model.safetensors").exists()
