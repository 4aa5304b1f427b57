"""The lean student: its rule against an independent float64 reference, the runtime kernel's eager and compiled
paths against the module, its state size, and the whole life cycle (meta-training, Hub folder, optimizer)."""

import numpy as np
import pytest
import torch

from amalgam_plugin.engine import amalgamate
from amalgam_plugin.hub import load_student, save_student
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.students import STUDENTS, Lean, LeanConfig
from amalgam_plugin.students.lean import LeanKernel


def lean(seed: int = 1) -> Lean:
    student = Lean()
    student.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases, so that every term of the rule is exercised
        student.hidden.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        student.delta.bias.fill_(0.05)
    return student


def reference(student: Lean, g, state, rank):
    """The rule written out in float64 numpy from docs/method.md#lean."""
    cfg = student.config
    w1, b1 = (t.detach().double().numpy() for t in (student.hidden.kernel, student.hidden.bias))
    w2, b2 = (t.detach().double().numpy() for t in (student.delta.kernel, student.delta.bias))
    g = g.double().numpy()
    new = {f"m{i}": beta * state[f"m{i}"].double().numpy() + (1 - beta) * g for i, beta in enumerate(cfg.betas)}
    new["v"] = cfg.beta2 * state["v"].double().numpy() + (1 - cfg.beta2) * g * g
    denom = np.sqrt(new["v"] + cfg.epsilon)
    x = np.stack([g / denom, new["m0"] / denom, new["m1"] / denom, new["m2"] / denom,
                  np.full_like(g, 1.0 if rank >= 2 else 0.0)], axis=1)
    h = np.maximum(x @ w1 + b1, 0.0)
    delta = cfg.output_scale * np.tanh(h @ w2[:, 0] + b2[0])
    return delta * (new["v"] > 0), new


def inputs(n=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)
    g[:7] = 0.0  # never-touched coordinates (v stays 0) must not move
    state = {k: torch.randn(n, generator=gen) * 1e-2 for k in ("m0", "m1", "m2")}
    state["v"] = torch.rand(n, generator=gen) * 1e-2
    state["v"][:7] = 0.0
    return g, state


@pytest.mark.parametrize("rank", [1, 2])
def test_the_rule_matches_the_float64_reference(rank):
    student, (g, state) = lean(), inputs()
    delta, new = student(g, state, rank)
    expected, expected_state = reference(student, g, state, rank)
    np.testing.assert_allclose(delta.detach().numpy(), expected, rtol=2e-5, atol=1e-7)
    for key, value in expected_state.items():
        np.testing.assert_allclose(new[key].numpy(), value, rtol=1e-5, atol=1e-8)  # float32 EMAs
    assert (delta[:7] == 0).all() and delta.abs().max() <= student.config.output_scale


def test_per_coordinate_ranks_as_in_meta_training():
    student, (g, state) = lean(), inputs(100)
    ranks = torch.tensor([1] * 40 + [2] * 60)
    mixed = student(g, state, ranks)[0]
    torch.testing.assert_close(mixed[:40], student(g[:40], {k: v[:40] for k, v in state.items()}, 1)[0])
    torch.testing.assert_close(mixed[40:], student(g[40:], {k: v[40:] for k, v in state.items()}, 2)[0])


def kernel_step(mode: str, monkeypatch, chunk=None):
    monkeypatch.setenv("AMALGAM_COMPILE", mode)
    student, (g, state) = lean(), inputs(5000)
    kernel = LeanKernel(student, torch.device("cpu"), chunk)
    p0 = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    p, s = p0.clone(), {k: v.clone() for k, v in state.items()}
    kernel.step([p], [g], [s], 0.5, [2])
    with torch.no_grad():
        delta, new = student(g, state, 2)
    return p, s, p0 - 0.5 * delta, new, kernel


def test_eager_kernel_gives_the_modules_numbers(monkeypatch):
    p, s, expected_p, expected_s, kernel = kernel_step("never", monkeypatch, chunk=777)  # ragged chunks
    assert kernel._compiled is None  # never built
    torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-6)
    for key in expected_s:
        torch.testing.assert_close(s[key], expected_s[key])


def test_compiled_kernel_gives_the_modules_numbers(monkeypatch):
    p, s, expected_p, expected_s, kernel = kernel_step("always", monkeypatch)
    assert kernel._compiled  # the compiled function ran (no silent fallback)
    torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-6)
    for key in expected_s:
        torch.testing.assert_close(s[key], expected_s[key])


def test_a_broken_compiler_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    p, _, expected_p, _, kernel = kernel_step("always", monkeypatch)
    assert kernel._compiled is False
    torch.testing.assert_close(p, expected_p, rtol=0, atol=1e-6)
    assert "using the eager path" in caplog.text


def test_state_is_four_floats_per_parameter():
    model = torch.nn.Linear(300, 200)
    opt = AmalgamOptimizer(model.parameters(), student=lean(), warmup_steps=1)
    for _ in range(3):
        model(torch.randn(8, 300)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    floats = sum(v.numel() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    assert floats == 4 * sum(p.numel() for p in model.parameters())


def test_bad_lean_configs_are_refused():
    with pytest.raises(ValueError, match="betas must be a list of 3"):
        LeanConfig(betas=[0.9])
    with pytest.raises(ValueError, match=r"hidden_size must be an integer in \[2, 256\]"):
        LeanConfig(hidden_size=10**6)


def test_meta_trained_saved_loaded_and_used(tmp_path):
    out = amalgamate(pool="small", mechanism="minmax", preset="smoke", out=tmp_path / "lean", student="lean",
                     evaluate=False)
    student = load_student(out)
    assert isinstance(student, Lean) and "lean" in STUDENTS
    save_student(student, tmp_path / "again")
    again = load_student(tmp_path / "again")
    for a, b in zip(student.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    model = torch.nn.Linear(10, 1)
    opt = AmalgamOptimizer(model.parameters(), student=str(out), warmup_steps=2)
    before = model.weight.detach().clone()
    for _ in range(4):
        model(torch.randn(16, 10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()
    resumed = AmalgamOptimizer(model.parameters(), student=str(out))
    resumed.load_state_dict(opt.state_dict())
    assert torch.equal(resumed.state[model.weight]["v"], opt.state[model.weight]["v"])


def test_the_compiled_step_is_not_recompiled_for_new_shapes_ranks_or_lrs(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("AMALGAM_COMPILE", "always")
    calls = []
    compile_ = torch.compile

    def spy(fn, **kwargs):  # the real compiler; its result counts its calls, so a silent eager fallback fails
        compiled = compile_(fn, **kwargs)

        def counted(*args):
            calls.append(args[0].numel())
            return compiled(*args)
        return counted

    monkeypatch.setattr(torch, "compile", spy)
    kernel = LeanKernel(lean(), torch.device("cpu"))

    def step(sizes, ranks, lr):
        flats, grads = [torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes]
        states = [{k: torch.zeros(n) for k in ("m0", "m1", "m2", "v")} for n in sizes]
        kernel.step(flats, grads, states, lr, ranks)

    step([1000, 20], [2, 1], 1.0)
    graphs = counters["stats"]["unique_graphs"]
    step([777, 33_333, 5], [2, 2, 1], 0.3)
    assert counters["stats"]["unique_graphs"] == graphs
    assert calls == [4, 4, 1000, 20, 777, 33_333, 5]  # the probes (rank features 0 and 1), then every tensor


@pytest.mark.parametrize("mode", ["never", "always"])
def test_a_parameter_with_no_elements_is_stepped_with_the_others(mode, monkeypatch):
    """An empty tensor (e.g. a zero-width layer) has nothing to update; the others step exactly as without it."""
    monkeypatch.setenv("AMALGAM_COMPILE", mode)
    student = lean()
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = []
    for with_empty in (True, False):
        empty, p = torch.nn.Parameter(torch.zeros(0, 3)), torch.nn.Parameter(torch.ones(4, 3))
        opt = AmalgamOptimizer([empty, p] if with_empty else [p], student=student, warmup_steps=1)
        for g in grads:
            empty.grad, p.grad = torch.zeros(0, 3), g.clone()
            opt.step()
        results.append(p.detach().clone())
    assert empty.shape == (0, 3) and not torch.equal(results[0], torch.ones(4, 3))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
