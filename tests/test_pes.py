"""PES, the second meta-gradient estimator (docs/method.md#pes): unbiased for the gradient of the whole unrolled
loss on a problem whose gradient is known in closed form, antithetic, the same on 2 processes as on 1, refused
when its particles would not fit in memory, and meta-training a student end to end."""

import json
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from amalgam_plugin.engine import amalgamate
from amalgam_plugin.engine.curriculum import PhaseConfig
from amalgam_plugin.engine.estimator import EstimatorConfig, TruncatedEstimator
from amalgam_plugin.engine.pes import PESEstimator, particles_bytes
from amalgam_plugin.engine.presets import PRESETS
from amalgam_plugin.problems import Problem
from amalgam_plugin.students import STUDENTS

sys.path.insert(0, str(Path(__file__).parent))
from test_meta_distributed import FLAKY_LAUNCH, result, succeeded  # noqa: E402

F64 = torch.float64
X0 = torch.tensor([1.0, -0.8], dtype=F64)  # the optimizee's start: one 1-D and one 2-D tensor of one scalar each
CURVATURE = torch.tensor([1.0, 2.0], dtype=F64)
STEP = torch.tensor([0.1, -0.05], dtype=F64)  # the student's weights: the step of each tensor rank
LENGTH, LAST = 5, 3  # inner steps per truncation; the truncation whose estimate is checked (the 4th)


@dataclass
class ExpQuadratic(Problem):
    """f(θ; x) = exp(½ x Σ_j c_j θ_j²), so that the meta loss's log f is a quadratic; the minibatch x is 1, or
    drawn from U[0.5, 1.5] with ``noisy``. Every minibatch the loss reads is recorded in ``seen``."""

    noisy: bool = False
    seen: list | None = None

    def init_params(self, generator):
        return [X0[:1].clone(), X0[1:].view(1, 1).clone()]

    def loss(self, params, batch):
        if self.seen is not None:
            self.seen.append(float(batch))
        theta = torch.cat([p.flatten() for p in params])
        return torch.exp(0.5 * batch * (CURVATURE * theta**2).sum())

    def train_batches(self, generator):
        while True:
            yield 0.5 + torch.rand((), generator=generator, dtype=F64) if self.noisy else torch.ones((), dtype=F64)


class RankStep(nn.Module):
    """Δ = w[rank − 1] (+ ``follow`` · g): a fixed step per tensor rank, stateless."""

    def __init__(self, follow: float = 0.0, weight: float = 1.0):
        super().__init__()
        self.w = nn.Parameter(STEP.clone())
        self.follow, self.weight = follow, weight

    def init_state(self, n, like):
        return {}

    def warmup_step(self, grad, state):
        return state

    def forward(self, grad, state, ranks):
        return self.weight * self.w[ranks - 1] + self.follow * grad, state


def problem(**kwargs) -> ExpQuadratic:
    return ExpQuadratic("exp-quadratic", None, None, random_scale=False, **kwargs)


def config(**settings) -> EstimatorConfig:
    return EstimatorConfig(unroll_length=LENGTH, second_order=False, random_scale=False, **settings)


def closed_form_gradients() -> tuple[torch.Tensor, torch.Tensor]:
    """∇_w of truncation LAST's meta loss, through the whole unroll and within the truncation alone. With
    θ_{t,i} = θ_t − i w and θ_t = θ_0 − t N w, L_t = c [−θ_t w m₁ + w² m₂ / 2] per coordinate, with m₁ and m₂ the
    means of i and i² over i = 0..N−1."""
    m1 = (LENGTH - 1) / 2
    m2 = (LENGTH - 1) * (2 * LENGTH - 1) / 6
    whole = CURVATURE * (-X0 * m1 + (2 * LAST * LENGTH * m1 + m2) * STEP)
    truncated = CURVATURE * (-X0 * m1 + (LAST * LENGTH * m1 + m2) * STEP)
    return whole, truncated


def test_the_closed_form_truncated_gradient_is_truncated_backpropagations():
    student = RankStep()
    estimator = TruncatedEstimator(student, problem(), [], config())
    traj = estimator.trajectory(torch.Generator().manual_seed(0), 0, with_teachers=False)
    for _ in range(LAST + 1):
        estimator.estimate(traj, 0.0)
    assert torch.allclose(student.w.grad, closed_form_gradients()[1], rtol=1e-7)


def test_pes_is_unbiased_for_the_gradient_of_the_whole_unroll_not_the_truncation():
    """Each sample: an independent trajectory of 8 pairs, its estimate at the 4th truncation. The loss is a
    quadratic in the weights used along the unroll, so Gaussian smoothing adds no bias at any σ: the mean estimate
    must sit within 4 standard errors of the whole unroll's gradient, while the truncation's own gradient (what
    an ES whose ξ restarts at every truncation estimates) is more than 8 standard errors away from it."""
    student = RankStep()
    estimator = PESEstimator(student, problem(), [], config(gradient_estimator="pes", pes_sigma=0.05, pes_pairs=8))
    samples = []
    for seed in range(60):
        traj = estimator.trajectory(torch.Generator().manual_seed(seed), 0, with_teachers=False)
        for _ in range(LAST + 1):
            assert estimator.estimate(traj, 0.0).finite
        samples.append(student.w.grad.clone())
    samples = torch.stack(samples)
    mean, error = samples.mean(0), samples.std(0) / len(samples) ** 0.5
    whole, truncated = closed_form_gradients()
    assert ((whole - truncated).abs() > 8 * error).all(), "the test cannot tell the two gradients apart"
    assert ((mean - whole).abs() < 4 * error).all(), (mean, whole, truncated, error)


def test_antithetic_particles_see_the_same_minibatches_and_a_flat_loss_gives_exactly_zero():
    """The student's weights have no effect (Δ = 0·w + 0.1·g), so the + and − particles follow one path and
    L+ == L− exactly, but only on the same minibatches: the loss's curvature is drawn per minibatch."""
    seen = []
    student = RankStep(follow=0.1, weight=0.0)
    estimator = PESEstimator(student, problem(noisy=True, seen=seen), [],
                             config(gradient_estimator="pes", pes_sigma=1e-6, pes_pairs=2))
    traj = estimator.trajectory(torch.Generator().manual_seed(3), 0, with_teachers=False)
    for _ in range(3):
        seen.clear()
        est = estimator.estimate(traj, 0.0)
        assert est.finite and est.steps == LENGTH
        per_particle = [seen[k : k + 2 * LENGTH] for k in range(0, len(seen), 2 * LENGTH)]  # objective, reference
        assert len(per_particle) == 4 and all(batches == per_particle[0] for batches in per_particle)
        assert len(set(per_particle[0])) == LENGTH  # a fresh minibatch at every step
        assert torch.equal(student.w.grad, torch.zeros_like(student.w))
    assert est.meta_loss < 0  # the particles did train


def test_a_pes_setting_beyond_the_machines_memory_is_one_clear_error(tmp_path):
    # 1000 pairs x 1000 trajectories of the Train CNN with RNNProp's 82 floats: about 11 TiB
    assert particles_bytes(18_122, 82, 1000, 1000) > 2**43
    pes = PRESETS["smoke"]
    recipe = replace(pes, name="smoke-pes", student=pes.student.changed(gradient_estimator="pes", pes_pairs=1000))
    with pytest.raises(ValueError, match=r"^PES with 1000 antithetic pairs x 1000 trajectories per process needs "
                                         r"about .* GiB .* lower pes_pairs or trajectories_per_step$"):
        amalgamate(pool="small", mechanism="minmax", preset=recipe, out=tmp_path / "out", evaluate=False,
                   trajectories_per_step=1000)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    (dict(gradient_estimator="es"), "unknown gradient_estimator 'es'; valid: truncated, pes"),
    (dict(pes_sigma=0.0), "pes_sigma must be a finite number > 0, got 0.0"),
    (dict(pes_pairs=0), "pes_pairs must be an integer >= 1, got 0"),
    (dict(gradient_estimator="pes", perturbation="gaussian"), "the pes estimator perturbs the student's weights"),
])
def test_bad_pes_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        PhaseConfig.of(**change)


WORKER = Path(__file__).with_name("pes_distributed_worker.py")


def test_two_processes_running_half_the_pairs_each_give_the_meta_gradient_of_one(tmp_path):
    from pes_distributed_worker import run

    run(tmp_path / "one", tmp_path / "one.safetensors")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKER),
               str(tmp_path / "two"), str(tmp_path / "two.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and any(f in done.stderr.lower() for f in FLAKY_LAUNCH):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    succeeded(done)
    (two, two_losses), (one, one_losses) = result(tmp_path / "two.safetensors"), result(tmp_path / "one.safetensors")
    assert one_losses == two_losses and len(one_losses) == 2 * 2
    assert one["gradients"].abs().sum() > 0 and len(one["gradients"]) == 2
    for name, value in one.items():
        assert torch.equal(two[name], value), name


def test_meta_training_with_pes_changes_the_student_and_keeps_it_finite(tmp_path):
    smoke = PRESETS["smoke"]
    recipe = replace(smoke, name="smoke-pes", student=smoke.student.changed(gradient_estimator="pes", pes_pairs=2,
                                                                            pes_sigma=0.01))
    out = amalgamate(pool="small", mechanism="minmax", preset=recipe, out=tmp_path / "out", evaluate=False, seed=4)
    entry = STUDENTS.lookup("rnnprop")
    start = entry.module(entry.config())
    start.reset_parameters(torch.Generator().manual_seed(4))  # meta_train's initialisation of a min-max student
    trained = load_file(str(out / "model.safetensors"))
    assert trained.keys() == start.state_dict().keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], v) for k, v in start.state_dict().items())
    readme = (out / "README.md").read_text()
    assert "'gradient_estimator': 'pes'" in readme and "the Python API amalgamate(...)" in readme


def test_the_estimator_benchmark_prints_the_cost_and_the_variance_of_both():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "estimator_variance.py"
    done = subprocess.run([sys.executable, str(script), "--problem", "mlp", "--unroll", "2", "--samples", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "truncated back-propagation, first-order:" in done.stdout and "PES, one antithetic pair" in done.stdout
    rows = re.findall(r"^(truncated|pes \(\d+ pairs?\)) +[\d.]+ +(\d+) ", done.stdout, re.M)
    assert [(name.split()[0], t) for name, t in rows] == [("truncated", "1"), ("pes", "1"), ("truncated", "3"),
                                                          ("pes", "3")]


def test_a_run_recorded_before_the_estimator_settings_existed_still_resumes(tmp_path):
    from amalgam_plugin.engine.run import RUN_KEYS, _check_same_run

    fresh = {k: "x" for k in RUN_KEYS} | {"choice_recipe": PhaseConfig().settings(),
                                           "student_recipe": PhaseConfig().settings()}
    older = {k: v for k, v in fresh["student_recipe"].items() if k not in ("gradient_estimator", "pes_sigma",
                                                                             "pes_pairs")}
    path = tmp_path / "training" / "run_config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(fresh | {"choice_recipe": older, "student_recipe": older}))
    _check_same_run(path, fresh)
    path.write_text(json.dumps(fresh | {"student_recipe": {**older, "gradient_estimator": "pes"}}))
    with pytest.raises(ValueError, match=r"holds a different run \(changed: student_recipe\)"):
        _check_same_run(path, fresh)
