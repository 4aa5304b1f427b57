"""The paper's pre-trained students bundled in hub_models/ (one replicate of each variant, converted from the
authors' release) load into RNNProp and reproduce the paper's update rule, checked against an independent numpy
float64 implementation of that rule (warm-up included: 100 SGD steps at 0.05 with the moments advancing and the
LSTM state frozen). The reference reads the raw arrays from the safetensors files itself, not through the
package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from amalgam_plugin import hub
from amalgam_plugin.students import RNNProp

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["paper-choice-large", "paper-choice-small", "paper-minmax", "paper-mean"]  # one of each variant
KEYS = {f"recurrent.{i}.{k}" for i in range(2) for k in ("kernel", "recurrent_kernel", "bias")} | {
    "delta.kernel",
    "delta.bias",
}


# --- the paper's rule, written independently in numpy float64 -----------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_updates(w: dict[str, np.ndarray], grads: np.ndarray, warmup: int = 100,
                      runtime: bool = False) -> np.ndarray:
    """Δ for each step (row) of ``grads`` [T, n]: the parameter moves by -Δ. ``runtime``: with AmalgamOptimizer's
    one addition, a coordinate whose gradients were all exactly 0 does not move."""
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
        delta = 0.1 * np.tanh(x @ w["delta.kernel"] + w["delta.bias"])[:, 0]
        out.append(delta * (v > 0) if runtime else delta)
    return np.stack(out)


def gradient_sequence(steps: int, n: int, seed: int) -> np.ndarray:
    """Gradients of mixed signs and magnitudes (1e-4 .. 1), persistent per coordinate, some exact zeros."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-4, 0, size=n)
    drift = rng.normal(size=n)
    g = scale * (drift + 0.7 * rng.normal(size=(steps, n)))
    g[:, 0] = 0.0
    return g


def raw_weights(name: str) -> dict[str, np.ndarray]:
    """The bundled student's arrays, read straight from its safetensors file (float32, as stored)."""
    return load_file(str(ROOT / "hub_models" / name / "model.safetensors"))


def load(name: str) -> tuple[dict[str, np.ndarray], RNNProp]:
    """(float64 copies of the raw arrays for the numpy reference, the student loaded by the package)."""
    weights = {k: v.astype(np.float64) for k, v in raw_weights(name).items()}
    return weights, hub.load_student(name)


@pytest.mark.parametrize("name", PAPER)
def test_student_module_matches_the_rule_in_float64(name):
    weights, student = load(name)
    student = student.double()
    grads = gradient_sequence(40, 64, seed=1)
    expected = reference_updates(weights, grads, warmup=10)
    state = student.init_state(64, torch.zeros(64, dtype=torch.float64))
    got = []
    with torch.no_grad():
        for t, g in enumerate(torch.from_numpy(grads), start=1):
            if t <= 10:
                state = student.warmup_step(g, state)
                got.append(0.05 * g)
            else:
                delta, state = student(g, state)
                got.append(delta)
    np.testing.assert_allclose(torch.stack(got).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert np.abs(expected[10:]).max() > 1e-3  # the learned branch produced real updates


@pytest.mark.parametrize("name", PAPER[:3])
def test_amalgam_optimizer_with_paper_weights_follows_the_rule(name):
    """Through AmalgamOptimizer (float32), the student's configured 100-step warm-up included."""
    from amalgam_plugin import optim

    weights, student = load(name)
    shapes = [(3, 5), (7,), (2, 2, 3)]
    sizes = [int(np.prod(s)) for s in shapes]
    steps = 125
    grads = gradient_sequence(steps, sum(sizes), seed=2)
    expected = reference_updates(weights, grads, warmup=100, runtime=True)
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


def test_every_bundled_paper_student_loads_strictly_with_its_stored_weights():
    bundled = sorted(name for name, _ in hub.list_bundled() if name.startswith("paper-"))
    assert bundled == sorted(PAPER)
    for name in bundled:
        raw = raw_weights(name)
        assert set(raw) == KEYS
        student = hub.load_student(name)  # strict=True after explicit key and shape checks
        assert isinstance(student, RNNProp)
        assert sum(p.numel() for p in student.parameters()) == 5141
        state = student.state_dict()
        assert set(state) == KEYS
        for key, array in raw.items():
            assert state[key].dtype == torch.float32
            np.testing.assert_array_equal(state[key].numpy(), array, err_msg=f"{name}: {key}")
        RNNProp().load_state_dict({k: torch.from_numpy(v) for k, v in raw.items()}, strict=True)


def test_student_from_npz_loads_the_papers_layout(tmp_path):
    """An .npz with the Keras variable names (the layout of the authors' release converted to numpy) loads;
    a file with other names is refused."""
    raw = raw_weights("paper-choice-large")
    path = tmp_path / "choice-large-4.npz"
    np.savez(path, **raw)
    student = hub.student_from_npz(path)
    assert isinstance(student, RNNProp) and not student.training
    assert not any(p.requires_grad for p in student.parameters())
    state = student.state_dict()
    assert set(state) == KEYS
    for key, array in raw.items():
        assert state[key].dtype == torch.float32
        np.testing.assert_array_equal(state[key].numpy(), array)
    assert hub.content_hash(student) == hub.content_hash(hub.load_student("paper-choice-large"))

    wrong = dict(raw)
    wrong["delta.weight"] = wrong.pop("delta.kernel")
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ValueError, match="does not hold RNNProp weights"):
        hub.student_from_npz(tmp_path / "wrong.npz")
