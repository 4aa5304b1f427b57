"""Meta-training on a mixture of problems: each trajectory draws its family and sizes from its own generator; every
family gives a finite meta-gradient, with the frozen choice teacher seeing each drawn problem's tensor ranks."""

import pytest
import torch

from amalgam_plugin.engine.estimator import EstimatorConfig, TruncatedEstimator
from amalgam_plugin.engine.unroll import frozen_choice_teacher
from amalgam_plugin.problems import make_problem
from amalgam_plugin.problems.text import CONTEXT, stdlib_windows
from amalgam_plugin.students import ChoiceNet, Lean

FAMILIES = ("cnn-", "mlp-", "char-lstm-", "transformer-")


def family(name: str) -> str:
    return next(f for f in FAMILIES if name.startswith(f))


def test_each_trajectory_draws_its_problem_from_its_own_generator():
    mix = make_problem("mix")
    names = [mix.pick(torch.Generator().manual_seed(seed)).name for seed in range(40)]
    assert names == [mix.pick(torch.Generator().manual_seed(seed)).name for seed in range(40)]
    assert {family(n) for n in names} == set(FAMILIES) and len(set(names)) > 8  # families and their sizes vary
    lm = next(seed for seed, n in enumerate(names) if n.startswith("transformer-"))
    assert not mix.pick(torch.Generator().manual_seed(lm)).random_scale  # language models run unscaled


BROAD_FAMILIES = (*FAMILIES, "relu-mlp-", "resnet-", "tabular-")


@pytest.mark.parametrize(("mixture", "families"), [("mix", FAMILIES), ("mix-broad", BROAD_FAMILIES)])
def test_every_family_gives_a_finite_meta_gradient_against_the_choice_teacher(mixture, families):
    torch.manual_seed(0)
    mix = make_problem(mixture)
    student = Lean()
    student.reset_parameters(torch.Generator().manual_seed(0))
    estimator = TruncatedEstimator(student, mix, [frozen_choice_teacher(ChoiceNet().requires_grad_(False))],
                                   EstimatorConfig(unroll_length=3, mechanism="choice", second_order=False))
    seen = set()
    for seed in range(60):
        traj = estimator.trajectory(torch.Generator().manual_seed(seed), 3, with_teachers=True)
        name = next(f for f in families if traj.problem.name.startswith(f))
        if name in seen:
            continue
        seen.add(name)
        assert torch.equal(traj.teacher_states[0]["ranks"], traj.ranks)
        estimate = estimator.estimate(traj, alpha=0.5)
        assert estimate.finite and estimate.steps == 3, traj.problem.name
        assert sum(float(p.grad.abs().sum()) for p in student.parameters()) > 0
    assert seen == set(families)


def test_byte_windows_label_each_position_with_the_next_byte():
    text = stdlib_windows()
    assert text.train_x.shape == (4000, CONTEXT) and text.train_x.dtype == torch.long
    assert torch.equal(text.train_y[:, :-1], text.train_x[:, 1:])
    assert int(text.train_x.max()) < 256


def test_whether_a_problem_can_be_evaluated_is_its_registry_entry_s_field(tmp_path, monkeypatch, capsys):
    """``evaluable`` on the entry, not a problem's name, decides: the mixture and any other non-evaluable problem are
    refused by ``amalgam evaluate`` in one line, before anything runs."""
    from dataclasses import replace

    from amalgam_plugin.cli import main
    from amalgam_plugin.problems import PROBLEMS, evaluable_problem
    from amalgam_plugin.suite import run_suite

    out = tmp_path / "never-written"
    assert not PROBLEMS["mix"].evaluable and PROBLEMS["train"].evaluable
    monkeypatch.setitem(PROBLEMS, "mlp", replace(PROBLEMS["mlp"], evaluable=False))
    for name in ("mix", "mlp"):
        with pytest.raises(ValueError, match=f"problem '{name}' is a distribution to meta-train on"):
            evaluable_problem(name)
        with pytest.raises(ValueError, match="not one to evaluate"):
            run_suite([], [name], [0], out)
        assert main(["evaluate", "torch.optim.SGD:lr=0.1", "--problems", name, "--out", str(out)]) == 2
        assert "not one to evaluate" in capsys.readouterr().err
    assert evaluable_problem("train") == "train" and not out.exists()


def test_the_augmented_mixture_draws_batch_sizes_loss_scales_and_deeper_mlps():
    """mix-aug: every trajectory's loss is its family's loss times a scale drawn over three decades, digit problems
    draw their batch size, and ReLU MLPs of 2 or 3 hidden layers join the families; draws are the generator's."""
    import torch.nn.functional as F

    from amalgam_plugin.problems import LOSS_SCALE_DECADES

    mix = make_problem("mix-aug")
    picks = [mix.pick(torch.Generator().manual_seed(seed)) for seed in range(60)]
    assert [p.name for p in picks] == [mix.pick(torch.Generator().manual_seed(s)).name for s in range(60)]
    scales, batches, depths = [], set(), set()
    for seed, problem in enumerate(picks):
        if problem.name.startswith(("char-lstm-", "transformer-")):
            assert problem.batch_size == 32 and not problem.random_scale
            continue
        generator = torch.Generator().manual_seed(seed)
        params = problem.init_params(generator)
        x, y = next(problem.train_batches(generator))
        unscaled = F.cross_entropy(problem.architecture.forward(params, x), y)
        scales.append(float(problem.loss(params, (x, y)) / unscaled))
        assert scales[-1] == pytest.approx(float(problem.name.rsplit("-loss", 1)[1]), rel=5e-3)
        batches.add(len(x))
        if problem.name.startswith("relu-mlp-"):
            depths.add(len(params) // 2 - 1)
    bound = 10 ** LOSS_SCALE_DECADES
    assert all(1 / bound <= s <= bound for s in scales) and min(scales) < 0.1 and max(scales) > 10
    assert batches == {32, 64, 128} and depths == {2, 3}


def test_a_relu_mlp_is_the_torch_stack_it_names():
    from amalgam_plugin.problems.models import relu_mlp

    arch = relu_mlp([7, 5], "relu-mlp-7-5")
    params = arch.init_params(torch.Generator().manual_seed(0))
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 7), torch.nn.ReLU(),
                                    torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 10))
    with torch.no_grad():
        layers = [reference[1], reference[3], reference[5]]
        for layer, (w, b) in zip(layers, zip(params[::2], params[1::2], strict=True), strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(arch.forward(params, x), reference(x), atol=1e-6)


def test_the_broad_mixture_adds_residual_batchnorm_cnns_and_tabular_regressions():
    """mix-broad: mix-aug's families plus residual BN CNNs (digits, drawn batch sizes, unscaled as normalization
    layers are) and MLP regressions of a drawn table column (batches of 32, mean squared error times the drawn
    scale); mix-aug's own draws are unchanged by it."""
    import torch.nn.functional as F

    mix = make_problem("mix-broad")
    picks = [mix.pick(torch.Generator().manual_seed(seed)) for seed in range(80)]
    resnets = [p for p in picks if p.name.startswith("resnet-")]
    tables = [p for p in picks if p.name.startswith("tabular-")]
    assert {p.batch_size for p in resnets} == {32, 64, 128} and not any(p.random_scale for p in resnets)
    assert {p.name.split("-")[1] for p in tables} == {"wine", "breast_cancer"}
    assert not any(p.random_scale or p.warmup for p in tables) and all(p.warmup for p in resnets)
    for problem in tables[:3]:
        generator = torch.Generator().manual_seed(0)
        params = problem.init_params(generator)
        x, y = next(problem.train_batches(generator))
        assert len(x) == 32 and y.shape == (32, 1)
        scale = float(problem.name.rsplit("-loss", 1)[1])
        unscaled = F.mse_loss(problem.architecture.forward(params, x), y)
        assert float(problem.loss(params, (x, y))) == pytest.approx(scale * float(unscaled), rel=5e-3)
    aug = make_problem("mix-aug")
    assert [aug.pick(torch.Generator().manual_seed(s)).name for s in range(3)] == [
        "relu-mlp-128-32-64-b32-loss0.934", "cnn-32-16-b128-loss0.0387", "transformer-64x2-b32-loss0.838"]


def test_a_column_regression_predicts_one_standardized_column_from_the_others():
    import numpy as np
    from sklearn.datasets import load_wine

    from amalgam_plugin.problems.tabular import column_regression

    raw = load_wine().data
    standard = (raw - raw.mean(0)) / raw.std(0, ddof=1)
    split = column_regression("wine", 3)
    assert np.allclose(split.train_y.numpy()[:, 0], standard[:, 3], atol=1e-5)
    assert np.allclose(split.train_x.numpy(), np.delete(standard, 3, axis=1), atol=1e-5)
    assert len(split.heldout()[0]) == 0  # meta-training reads training rows only


def test_a_residual_block_starts_as_its_shortcut():
    """The last gain of each branch starts at 0 (timm's zero_init_last), so at initialization every block is
    ReLU(shortcut(x)); the net maps digits to 10 logits, one block per width, halving after the first."""
    from amalgam_plugin.problems.residual import ResidualBlock, residual_cnn

    torch.manual_seed(0)
    net = residual_cnn([8, 16, 32], pool_stem=True)
    blocks = [m for m in net if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    x = torch.randn(4, 1, 28, 28)
    assert net(x).shape == (4, 10)
    h = net[:4](x)  # the stem's output: conv, BN, ReLU, max-pool
    for block in blocks:
        out = block(h)
        assert torch.equal(out, torch.relu(block.shortcut(h)))
        h = out
    assert h.shape == (4, 32, 4, 4)


def test_a_card_says_which_mixtures_read_the_tables():
    """The card's data split names the tables for the mixture that reads them, and for no other."""
    from amalgam_plugin.engine.provenance import mixture_split_text

    assert "tables of the mixture" in mixture_split_text("mix-broad")
    assert all("tables" not in mixture_split_text(name) for name in ("mix", "mix-aug", "train"))
