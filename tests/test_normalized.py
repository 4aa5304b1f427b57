"""The normalized student: its rule against an independent float64 reference, the runtime kernel's eager and
compiled paths, what ``lr`` means (the update's RMS per tensor), schedules, state, bf16, each part of the harness
against its formula (Newton-Schulz, torch's AdamW, decoupled decay), the Hub folder and the whole life cycle."""

import json
import math

import numpy as np
import pytest
import torch

from amalgam_plugin.engine import amalgamate
from amalgam_plugin.hub import load_student, save_student
from amalgam_plugin.optim import AmalgamOptimizer
from amalgam_plugin.students import STUDENTS
from amalgam_plugin.students.normalized import (
    Normalized,
    NormalizedConfig,
    NormalizedKernel,
    newton_schulz,
    orthogonalized_,
)

SHAPES = [(30, 20), (20,), (7, 3, 4), (50,)]
HARNESS = {"orthogonalize": True, "adamw_1d": True, "weight_decay": 0.1}
CONFIGS = {"plain": {}, "harness": HARNESS, "sized": {**HARNESS, "adamw_size": True},
           "sized alone": {"adamw_size": True}, "sketched": {**HARNESS, "ns_steps": 2, "ns_rank": 4}}


def student(seed: int = 1, **config) -> Normalized:
    net = Normalized(NormalizedConfig(**config))
    net.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases and a random first layer, so that every term of the rule is exercised
        net.hidden.kernel.add_(torch.randn(net.hidden.kernel.shape, generator=torch.Generator().manual_seed(seed)))
        net.hidden.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        net.delta.bias.fill_(0.05)
    return net


def np_newton_schulz(y, shape, steps):
    x = y.reshape(shape[0], -1)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return (x if wide else x.T).reshape(-1)


def np_gain(sigma, steps):
    """Newton-Schulz's quintic iterated on singular values ``sigma`` of a Frobenius-normalized matrix, over sigma."""
    f = sigma.copy()
    for _ in range(steps):
        f = 3.4445 * f - 4.7750 * f**3 + 2.0315 * f**5
    return f / sigma


def np_sketched_newton_schulz(y, shape, steps, rank, seed):
    """The sketch as its docstring defines it, in float64: the range of ``x xᵀ x q`` (q: ``rank`` Gaussian vectors
    from torch's generator seeded ``seed``), the quintic on the singular values of ``x`` there, the rest of ``x``
    scaled by the gain at its RMS singular value."""
    x = y.reshape(shape[0], -1)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    if x.shape[0] <= rank:
        return np_newton_schulz(y, shape, steps)
    q = torch.randn(x.shape[1], rank, generator=torch.Generator().manual_seed(seed)).double().numpy()
    u = np.linalg.qr(x @ (x.T @ (x @ q)))[0]
    inside = u @ (u.T @ x)
    a, s, bt = np.linalg.svd(inside, full_matrices=False)
    a, s, bt = a[:, :rank], s[:rank], bt[:rank]  # inside has rank <= rank: the rest are rounding
    norm = np.linalg.norm(x)
    rest = x - inside
    bulk = np.linalg.norm(rest) / np.sqrt(x.shape[0] - rank) / norm
    top = (a * (s * np_gain(s / norm, steps))) @ bt
    out = top + np_gain(np.array([bulk]), steps)[0] * rest
    return (out if wide else out.T).reshape(-1)


def reference(net: Normalized, g, state, shapes, lr):
    """The rule written out in float64 numpy from the module docstring: the update ``lr · u`` and the state."""
    cfg = net.config
    w1, b1 = (t.detach().double().numpy() for t in (net.hidden.kernel, net.hidden.bias))
    w2, b2 = (t.detach().double().numpy() for t in (net.delta.kernel, net.delta.bias))
    g = g.double().numpy()
    t = state["step"] + 1
    new = {f"m{i}": beta * state[f"m{i}"].double().numpy() + (1 - beta) * g for i, beta in enumerate(cfg.betas)}
    new["v"] = cfg.beta2 * state["v"].double().numpy() + (1 - cfg.beta2) * g * g
    d = np.sqrt(new["v"] / (1 - cfg.beta2**t)) + cfg.epsilon
    hats = [new[f"m{i}"] / (1 - beta**t) for i, beta in enumerate(cfg.betas)]
    out, start = [], 0
    for shape in shapes:
        sl = slice(start, start + math.prod(shape))
        start = sl.stop
        x = np.stack([g[sl] / d[sl]] + [m[sl] / d[sl] for m in hats] + [np.full(sl.stop - sl.start,
                                                                                 float(len(shape) >= 2))], axis=1)
        y = (np.maximum(x @ w1 + b1, 0.0) @ w2[:, 0] + b2[0]) * (new["v"][sl] > 0)
        if cfg.adamw_1d and len(shape) <= 1:
            out.append(hats[1][sl] / d[sl])
            continue
        if cfg.orthogonalize and len(shape) >= 2 and cfg.ns_rank:
            y = np_sketched_newton_schulz(y, shape, cfg.ns_steps, cfg.ns_rank, t) * (new["v"][sl] > 0)
        elif cfg.orthogonalize and len(shape) >= 2:
            y = np_newton_schulz(y, shape, cfg.ns_steps) * (new["v"][sl] > 0)
        size = np.sqrt(np.mean((hats[1][sl] / d[sl]) ** 2)) if cfg.adamw_size else 1.0
        out.append(size * y / np.sqrt(np.mean(y * y) + 1e-30))
    return lr * np.concatenate(out), new


def inputs(shapes=SHAPES, seed=0, step=3):
    """A gradient over 5 decades and a state after ``step`` steps; the first 7 coordinates never had a gradient
    (v = 0), so they must not move."""
    n = sum(math.prod(s) for s in shapes)
    gen = torch.Generator().manual_seed(seed)
    g, m0, m1, m2, v = torch.randn(5, n, generator=gen) * torch.tensor([[1.0], [1e-2], [1e-2], [1e-2], [1e-1]])
    g *= 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)
    state = {"m0": m0, "m1": m1, "m2": m2, "v": v.square(), "step": step}
    for t in (g, m0, m1, m2, state["v"]):
        t[:7] = 0.0
    return g, state


@pytest.mark.parametrize("config", CONFIGS)
def test_the_rule_matches_the_float64_reference(config):
    net, (g, state) = student(**CONFIGS[config]), inputs()
    delta, new = net(g, state, SHAPES)
    expected, expected_state = reference(net, g, state, SHAPES, net.config.lr)
    np.testing.assert_allclose(delta.detach().numpy(), expected, rtol=1e-4, atol=1e-8)
    for key, value in expected_state.items():
        np.testing.assert_allclose(new[key].numpy(), value, rtol=1e-5, atol=1e-8)  # float32 EMAs
    assert new["step"] == 4 and (delta[:7] == 0).all()


def kernel_step(mode, monkeypatch, config="plain", chunk=None, lr=0.01):
    """The runtime kernel on the tensors of SHAPES: the parameters and states after one step, and the module's."""
    monkeypatch.setenv("AMALGAM_COMPILE", mode)
    net, (g, state) = student(**CONFIGS[config]), inputs()
    sizes = [math.prod(s) for s in SHAPES]
    kernel = NormalizedKernel(net, torch.device("cpu"), chunk)
    p0 = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(3))
    flats = [t.clone() for t in p0.split(sizes)]
    states = [{**{k: state[k].split(sizes)[i].clone() for k in ("m0", "m1", "m2", "v")}, "step": state["step"] + 1}
              for i in range(len(sizes))]
    kernel.step(flats, list(g.split(sizes)), states, lr, SHAPES)
    expected, expected_state = reference(net, g, state, SHAPES, lr)
    return torch.cat(flats), states, p0.double().numpy() - expected, expected_state, kernel


@pytest.mark.parametrize("config", CONFIGS)
def test_eager_kernel_matches_the_reference(monkeypatch, config):
    p, states, expected_p, expected_state, kernel = kernel_step("never", monkeypatch, config, chunk=77)  # ragged
    assert kernel._compiled is None  # never built
    np.testing.assert_allclose(p.numpy(), expected_p, rtol=0, atol=1e-6)
    np.testing.assert_allclose(torch.cat([s["v"] for s in states]).numpy(), expected_state["v"], rtol=1e-5, atol=1e-9)


def test_compiled_kernel_matches_the_reference_without_recompiling_for_a_new_step(monkeypatch):
    from torch._dynamo.utils import counters

    p, _, expected_p, _, kernel = kernel_step("always", monkeypatch)
    assert kernel._compiled  # the compiled function ran (no silent fallback)
    np.testing.assert_allclose(p.numpy(), expected_p, rtol=0, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    flats, grads = [torch.randn(500), torch.randn(9_999)], [torch.randn(500), torch.randn(9_999)]
    states = [{"m0": torch.zeros(n), "m1": torch.zeros(n), "m2": torch.zeros(n), "v": torch.zeros(n), "step": 7}
              for n in (500, 9_999)]
    kernel.step(flats, grads, states, 0.3, [(20, 25), (9_999,)])
    assert counters["stats"]["unique_graphs"] == graphs


def test_two_students_compiled_in_one_process_keep_their_own_weights(monkeypatch):
    """The weights are compiled into each kernel's loop as constants: two students stepped in turn each give their
    own float64 reference, and each kernel keeps its own two graphs (rank feature 0 and 1) within its own
    recompile limit (2 here: with one compile cache for both, the second student's graphs would not be compiled)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("AMALGAM_COMPILE", "always")
    with torch._dynamo.config.patch(recompile_limit=2):  # the config's own patch restores it (setattr does not)
        before = counters["stats"]["unique_graphs"]
        nets = [student(seed=1), student(seed=2)]
        kernels = [NormalizedKernel(net, torch.device("cpu")) for net in nets]
        g, state = inputs()
        sizes = [math.prod(s) for s in SHAPES]
        for round_ in range(2):
            for net, kernel in zip(nets, kernels, strict=True):
                p0 = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(round_))
                flats = [t.clone() for t in p0.split(sizes)]
                states = [{**{k: state[k].split(sizes)[i].clone() for k in ("m0", "m1", "m2", "v")},
                           "step": state["step"] + 1} for i in range(len(sizes))]
                kernel.step(flats, list(g.split(sizes)), states, 0.01, SHAPES)
                expected = p0.double().numpy() - reference(net, g, state, SHAPES, 0.01)[0]
                np.testing.assert_allclose(torch.cat(flats).numpy(), expected, rtol=0, atol=1e-6)
            if round_ == 0:
                graphs = counters["stats"]["unique_graphs"]
                assert graphs == before + 4  # two per student, all compiled
        assert counters["stats"]["unique_graphs"] == graphs


def model_and_grads(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5)).to(dtype)
    return model, list(model.parameters())


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype)


def rms(t):
    return t.double().square().mean().sqrt().item()


def test_lr_is_the_rms_of_every_tensors_update_and_its_default():
    _, params = model_and_grads()
    opt = AmalgamOptimizer(params, student=student())
    assert opt.param_groups[0]["lr"] == 1e-3 == student().config.lr
    for step in range(3):
        before = [p.detach().clone() for p in params]
        set_grads(params, step)
        opt.step()
        for p, b in zip(params, before, strict=True):
            assert rms(b - p.detach()) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("compile_mode", ["never", "always"])
def test_adamw_size_moves_each_tensor_as_far_as_torch_adamw(monkeypatch, compile_mode):
    """With ``adamw_size`` each tensor's step has the RMS of torch's AdamW step at the same lr on the same
    gradients (noisy ones here, so AdamW's steps shrink well below lr); the direction stays the rule's."""
    monkeypatch.setenv("AMALGAM_COMPILE", compile_mode)
    _, ours = model_and_grads()
    _, theirs = model_and_grads()
    opt = AmalgamOptimizer(ours, student=student(adamw_size=True), lr=0.01)
    adamw = torch.optim.AdamW(theirs, lr=0.01, weight_decay=0.0)
    sizes = []
    for step in range(8):
        before = [p.detach().clone() for p in ours + theirs]
        set_grads(ours, step)
        set_grads(theirs, step)
        opt.step()
        adamw.step()
        moved = [rms(b - p.detach()) for p, b in zip(ours + theirs, before, strict=True)]
        for a, b in zip(moved[: len(ours)], moved[len(ours):], strict=True):
            assert a == pytest.approx(b, rel=1e-4)
        sizes.append(moved[0])
    assert sizes[-1] < 0.5 * 0.01  # AdamW's annealing on noise, which the plain rule (always 0.01) lacks


def test_an_adamw_learning_rate_draws_no_warning():
    import warnings

    _, params = model_and_grads()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AmalgamOptimizer(params, student=student(), lr=1e-4)


def test_lr_zero_moves_nothing_but_the_state_advances():
    _, params = model_and_grads()
    before = [p.detach().clone() for p in params]
    opt = AmalgamOptimizer(params, student=student(**HARNESS), lr=0.0)
    set_grads(params, 0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert opt.state[params[0]]["v"].abs().sum() > 0


def test_a_scheduler_scales_the_update():
    _, params = model_and_grads()
    opt = AmalgamOptimizer(params, student=student(), lr=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    for step in range(4):
        before = params[0].detach().clone()
        set_grads(params, step)
        opt.step()
        schedule.step()
        assert rms(before - params[0].detach()) == pytest.approx(0.01 * 0.5**step, rel=1e-4)


@pytest.mark.parametrize("config", ["harness", "sketched"])
def test_state_dict_round_trip_is_exact(config):
    """A resumed run steps exactly as the one that never stopped (the sketch's test vectors come from the step
    count, which the state holds)."""
    model, params = model_and_grads()
    opt = AmalgamOptimizer(params, student=student(**CONFIGS[config]))
    for step in range(3):
        set_grads(params, step)
        opt.step()
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = AmalgamOptimizer(twin, student=student(**CONFIGS[config]))
    resumed.load_state_dict(opt.state_dict())
    for step in range(3, 5):
        set_grads(params, step)
        set_grads(twin, step)
        opt.step()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twin, strict=True))
    assert all(torch.equal(opt.state[a]["m2"], resumed.state[b]["m2"]) for a, b in zip(params, twin, strict=True))


def test_bf16_parameters_move_by_lr_with_float32_state():
    _, params = model_and_grads(dtype=torch.bfloat16)
    opt = AmalgamOptimizer(params, student=student(), lr=0.05)
    before = [p.detach().clone() for p in params]
    set_grads(params, 0)
    opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)
    assert opt.state[params[0]]["v"].dtype == torch.float32
    for p, b in zip(params, before, strict=True):  # bf16 rounding of the moved values: a few percent
        assert rms(b - p.detach()) == pytest.approx(0.05, rel=0.05)


def test_newton_schulz_output_is_near_orthogonal():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 64, generator=gen) @ torch.diag(10 ** torch.linspace(-2, 1, 64))  # condition ~300
    for matrix in (g, g.T):
        x = newton_schulz(matrix.flatten(), tuple(matrix.shape), 5).reshape(matrix.shape).double()
        assert torch.linalg.cond(matrix) > 200
        singular = torch.linalg.svdvals(x)  # Muon's quintic: within about [0.5, 1.2] after 5 steps
        assert singular.min() > 0.5 and singular.max() < 1.25
        u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        cosine = (x * (u @ vh)).sum() / (x.norm() * (u @ vh).norm())
        assert cosine > 0.9  # the polar factor's direction, not just any orthogonal matrix


@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (30, 4, 3, 3)])
def test_the_sketch_is_newton_schulz_on_the_strongest_directions(shape):
    """``ns_rank``: exact (``newton_schulz`` up to scale) on a matrix of rank <= ns_rank, and on one of five strong
    directions over a flat floor of full rank (what it approximates: the floor scaled as a whole), where the raw
    update is not."""
    config = NormalizedConfig(orthogonalize=True, ns_steps=2, ns_rank=8)
    gen = torch.Generator().manual_seed(0)
    rows, cols = shape[0], math.prod(shape[1:])
    unit = lambda t: t / t.norm()  # noqa: E731
    low = (torch.randn(rows, 5, generator=gen) @ torch.randn(5, cols, generator=gen)).flatten()
    torch.testing.assert_close(unit(orthogonalized_(low, shape, config, step=1)),
                               unit(newton_schulz(low, shape, 2)), rtol=0, atol=2e-6)
    k = min(rows, cols)
    left, right = (torch.linalg.qr(torch.randn(d, k, generator=gen)).Q for d in (rows, cols))
    sigma = torch.cat([torch.tensor([40.0, 35, 30, 25, 20]), torch.ones(k - 5)])
    floored = ((left * sigma) @ right.T).flatten()
    whole = unit(newton_schulz(floored, shape, 2))
    assert (unit(orthogonalized_(floored, shape, config, step=1)) @ whole) > 0.9999 > 0.95 > unit(floored) @ whole


def test_the_harness_orthogonalizes_matrices_only():
    model, params = model_and_grads()
    opt = AmalgamOptimizer(params, student=student(orthogonalize=True), lr=0.01)
    before = [p.detach().clone() for p in params]
    set_grads(params, 0)
    opt.step()
    weight_update = before[0] - params[0].detach()
    singular = torch.linalg.svdvals(weight_update.double())
    assert singular.max() / singular.min() < 3 and rms(weight_update) == pytest.approx(0.01, rel=1e-4)
    assert rms(before[1] - params[1].detach()) == pytest.approx(0.01, rel=1e-4)  # a bias: normalized rule


def test_the_harness_steps_vectors_as_torch_adamw():
    _, params = model_and_grads()
    bias = params[1]
    copy = bias.detach().clone().requires_grad_(True)
    ours = AmalgamOptimizer(params, student=student(adamw_1d=True, weight_decay=0.05), lr=0.01)
    theirs = torch.optim.AdamW([copy], lr=0.01, weight_decay=0.05)
    for step in range(6):
        set_grads(params, step)
        copy.grad = bias.grad.clone()
        ours.step()
        theirs.step()
        torch.testing.assert_close(bias.detach(), copy.detach(), rtol=0, atol=1e-6)


def test_the_harness_decays_weights_as_adamw():
    _, plain = model_and_grads()
    _, decayed = model_and_grads()
    lr, wd = 0.01, 0.1
    before = [p.detach().clone() for p in decayed]
    opt_plain = AmalgamOptimizer(plain, student=student(orthogonalize=True))
    opt_decayed = AmalgamOptimizer(decayed, student=student(orthogonalize=True, weight_decay=wd), lr=lr)
    assert opt_decayed.param_groups[0]["weight_decay"] == wd and opt_plain.param_groups[0]["lr"] == 1e-3
    opt_plain.param_groups[0]["lr"] = lr
    set_grads(plain, 0)
    set_grads(decayed, 0)
    opt_plain.step()
    opt_decayed.step()
    for p, q, b in zip(plain, decayed, before, strict=True):  # the update does not depend on θ
        torch.testing.assert_close(q.detach(), p.detach() - lr * wd * b, rtol=0, atol=1e-7)


def test_saved_loaded_and_config_json_records_every_switch(tmp_path):
    net = student(**CONFIGS["sized"], ns_steps=4, ns_rank=16, lr=3e-4)
    save_student(net, tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert {k: config[k] for k in (*CONFIGS["sized"], "ns_steps", "ns_rank", "lr", "warmup_steps")} == {
        **CONFIGS["sized"], "ns_steps": 4, "ns_rank": 16, "lr": 3e-4, "warmup_steps": 0}
    again = load_student(tmp_path / "s")
    assert isinstance(again, Normalized) and again.config == net.config
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))


def test_the_harness_refuses_a_model_without_matrices():
    with pytest.raises(ValueError, match="needs a tensor of rank >= 2, but all 2 tensors given have rank <= 1"):
        AmalgamOptimizer([torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(3))],
                         student=student(orthogonalize=True))
    g, state = inputs([(5,)])
    with pytest.raises(ValueError, match="needs a tensor of rank >= 2"):
        student(adamw_1d=True)(g, state, [(5,)])
    AmalgamOptimizer([torch.nn.Parameter(torch.zeros(5))], student=student())  # no harness: fine


def test_ranks_are_refused_where_shapes_are_needed():
    g, state = inputs([(10,)])
    with pytest.raises(ValueError, match="needs the tensors' shapes"):
        student()(g, state, torch.ones(10))


def test_meta_trained_saved_loaded_and_used(tmp_path):
    out = amalgamate(pool="small", mechanism="minmax", preset="smoke", out=tmp_path / "n", student="normalized",
                     evaluate=False)
    trained = load_student(out)
    assert isinstance(trained, Normalized) and STUDENTS["normalized"].trainable
    model = torch.nn.Linear(10, 1)
    opt = AmalgamOptimizer(model.parameters(), student=str(out))
    before = model.weight.detach().clone()
    for _ in range(4):
        model(torch.randn(16, 10)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert rms(model.weight.detach() - before) > 0 and torch.isfinite(model.weight).all()


def test_an_empty_parameter_is_stepped_with_the_others():
    empty, weight = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.ones(4, 3))
    opt = AmalgamOptimizer([empty, weight], student=student())
    empty.grad, weight.grad = torch.zeros(0), torch.full((4, 3), 0.5)
    opt.step()
    assert rms(1 - weight.detach()) == pytest.approx(1e-3, rel=1e-4) and empty.numel() == 0


def test_the_meta_gradient_is_finite_where_a_coordinate_never_had_a_gradient():
    net, (g, state) = student(), inputs()
    g = g.clone().requires_grad_(True)  # second-order meta-training: the update is differentiated through g
    delta, _ = net(g, state, SHAPES)
    delta.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters()) and torch.isfinite(g.grad).all()
