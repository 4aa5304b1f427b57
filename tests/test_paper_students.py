"""The paper's pre-trained students load into RNNProp and reproduce the update rule written in
shared/reference/paper_students/README.md, checked against an independent numpy float64 implementation of that
rule (warm-up included: 100 SGD steps at 0.05 with the moments advancing and the LSTM state frozen)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PAPER_STUDENTS

from amalgam_plugin.students import RNNProp, RNNPropConfig

FILES = ["choice-large-1.npz", "choice-small-4.npz", "min-max-6.npz", "mean-8.npz"]  # one of each variant


# --- the README's rule, written independently in numpy float64 ----------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def readme_updates(w: dict[str, np.ndarray], grads: np.ndarray, warmup: int = 100) -> np.ndarray:
    """Δ for each step (row) of ``grads`` [T, n]: the parameter moves by -Δ."""
    n = grads.shape[1]
    m, v = np.zeros(n), np.zeros(n)
    h = [np.zeros((n, 20)), np.zeros((n, 20))]
    c = [np.zeros((n, 20)), np.zeros((n, 20))]
    out = []
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g  # step 1 runs on every step, warm-up included
        v = 0.999 * v + 0.001 * g**2
        if t <= warmup:
            out.append(0.05 * g)  # plain SGD, LSTM state stays at zero
            continue
        m_hat, v_hat = m / 0.1, v / 0.001
        x = np.stack([m_hat / np.sqrt(v_hat + 1e-10), g / np.sqrt(v_hat + 1e-10)], axis=-1)
        for layer in range(2):
            z = x @ w[f"recurrent.{layer}.kernel"] + h[layer] @ w[f"recurrent.{layer}.recurrent_kernel"]
            z = z + w[f"recurrent.{layer}.bias"]
            i, f, cc, o = np.split(z, 4, axis=-1)
            c[layer] = _sigmoid(f) * c[layer] + _sigmoid(i) * np.tanh(cc)
            h[layer] = _sigmoid(o) * np.tanh(c[layer])
            x = h[layer]
        out.append(0.1 * np.tanh(x @ w["delta.kernel"] + w["delta.bias"])[:, 0])
    return np.stack(out)


def gradient_sequence(steps: int, n: int, seed: int) -> np.ndarray:
    """Gradients of mixed signs and magnitudes (1e-4 .. 1), persistent per coordinate, some exact zeros."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 0, size=n)
    drift = rng.normal(size=n)
    g = scale * (drift + 0.7 * rng.normal(size=(steps, n)))
    g[:, 0] = 0.0
    return g


def load_npz(name: str) -> tuple[dict[str, np.ndarray], RNNProp]:
    arrays = dict(np.load(PAPER_STUDENTS / name))
    student = RNNProp(RNNPropConfig())
    student.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    return {k: v.astype(np.float64) for k, v in arrays.items()}, student.eval().requires_grad_(False)


@pytest.mark.parametrize("name", FILES)
def test_student_module_matches_readme_rule_in_float64(name):
    weights, student = load_npz(name)
    student = student.double()
    grads = gradient_sequence(40, 64, seed=1)
    expected = readme_updates(weights, grads, warmup=10)
    state = student.init_state(64, torch.zeros(64, dtype=torch.float64))
    got = []
    with torch.no_grad():
        for t, g in enumerate(torch.from_numpy(grads), start=1):
            if t <= 10:
                state = student.update_moments(g, state)
                got.append(0.05 * g)
            else:
                delta, state = student(g, state)
                got.append(delta)
    np.testing.assert_allclose(torch.stack(got).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert np.abs(expected[10:]).max() > 1e-3  # the learned branch produced real updates


@pytest.mark.parametrize("name", FILES[:3])
def test_amalgam_optimizer_with_paper_weights_follows_readme_rule(name):
    """Through AmalgamOptimizer (float32), the student's configured 100-step warm-up included."""
    from amalgam_plugin import optim
    weights, student = load_npz(name)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    sizes = [int(np.prod(s)) for s in shapes]
    steps = 125
    grads = gradient_sequence(steps, sum(sizes), seed=2)
    expected = readme_updates(weights, grads, warmup=100)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = optim.AmalgamOptimizer(params, student=student)
    assert student.config.warmup_steps == 100 and student.config.warmup_lr == 0.05
    got = []
    for g in torch.from_numpy(grads.astype(np.float32)):
        before = torch.cat([p.detach().flatten() for p in params]).double()
        for p, chunk in zip(params, g.split(sizes), strict=True):
            p.grad = chunk.view(p.shape).clone()
        opt.step()
        got.append((before - torch.cat([p.detach().flatten() for p in params]).double()).numpy())
    got = np.stack(got)
    np.testing.assert_allclose(got[:100], expected[:100], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[100:], expected[100:], rtol=1e-3, atol=2e-6)
    learned = expected[100:]
    assert np.abs(learned - 0.05 * grads[100:]).max() > 1e-3  # past the warm-up the learned rule ran


def test_every_paper_file_loads_strictly():
    names = sorted(p.name for p in PAPER_STUDENTS.glob("*.npz"))
    assert len(names) == 32
    for name in names:
        _, student = load_npz(name)
        assert sum(p.numel() for p in student.parameters()) == 5141


def test_selection_shortcut_equals_a_full_run_through_amalgam_optimizer():
    """benchmarks/select_paper_students.py shares the warm-up among replicates and then steps the student
    module; its curve must be the one evaluate.run gives through AmalgamOptimizer."""
    import sys

    from amalgam_plugin.evaluate import run, student_factory
    from amalgam_plugin.problems import make_problem

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import select_paper_students as selection
    finally:
        sys.path.pop(0)
    _, student = load_npz("mean-8.npz")
    student.config.warmup_steps = 10
    problem = make_problem("mlp")
    warm = selection.Warmup(problem, seed=3, steps=10, lr=0.05, eval_every=5, config=student.config)
    shortcut = selection.continue_run(problem, warm, student, seed=3, steps=30, eval_every=5)
    full = run(problem, student_factory(student), seed=3, steps=30, eval_every=5)
    assert shortcut["eval_steps"] == full.eval_steps
    np.testing.assert_allclose(shortcut["val_loss"], full.heldout, rtol=1e-4)
    assert shortcut["best_log_val"] == pytest.approx(full.best_log_heldout, rel=1e-4)
