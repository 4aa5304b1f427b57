"""Teachers against their formulas (docs/method.md#teachers, computed independently in float64 numpy) and the textbook
forms against torch.optim."""

import numpy as np
import pytest
import torch

from amalgam_plugin.teachers import (
    POOLS,
    TeacherOptimizer,
    make_pool,
    make_teacher,
    torch_teacher,
)

GRADS = np.random.default_rng(0).normal(size=(6, 7)) * np.array([1e-3, 1e-2, 0.1, 1, 10, -1, 0])


def run_rule(teacher, grads=GRADS):
    """Deltas of a teacher over a sequence of gradients, in float64."""
    state = teacher.init(torch.zeros(grads.shape[1], dtype=torch.float64))
    deltas = []
    for g in grads:
        d, state = teacher.update(torch.tensor(g), state)
        deltas.append(d.numpy())
    return np.array(deltas)


def reference(name, hp, grads=GRADS):
    """The l2o update rules of docs/method.md#teachers, written out in numpy."""
    m = np.zeros(grads.shape[1])
    v = np.zeros(grads.shape[1])
    out = []
    for g in grads:
        if name == "adam":
            m = hp["beta1"] * m + (1 - hp["beta1"]) * g
            v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
            out.append(hp["lr"] * (m / (1 - hp["beta1"])) / np.sqrt(v / (1 - hp["beta2"]) + hp["eps"]))
        elif name == "rmsprop":
            v = hp["rho"] * v + (1 - hp["rho"]) * g * g
            out.append(hp["lr"] * g / np.sqrt(v + hp["eps"]))
        elif name == "sgd":
            out.append(hp["lr"] * g)
        elif name == "momentum":
            m = hp["beta"] * m + (1 - hp["beta"]) * g
            out.append(hp["lr"] * m)
        elif name in ("addsign", "powersign"):
            m = hp["beta1"] * m + (1 - hp["beta1"]) * g
            v = hp["beta2"] * v + (1 - hp["beta2"]) * g * g
            agree = np.tanh(g / np.sqrt(v + hp["eps"])) * np.tanh(m / np.sqrt(v + hp["eps"]))
            out.append(hp["lr"] * ((1 + agree) if name == "addsign" else np.exp(agree)) * g)
    return np.array(out)


@pytest.mark.parametrize("pool", ["large", "choice-large", "choice-small"])
def test_paper_forms_follow_their_formulas(pool):
    for teacher in make_pool(pool):
        np.testing.assert_allclose(run_rule(teacher), reference(teacher.name, teacher.hparams), rtol=1e-10,
                                   atol=1e-14, err_msg=teacher.name)


def test_paper_adam_differs_from_textbook_adam_by_its_constant_bias_correction():
    # step 1: identical to textbook Adam up to epsilon placement; at steady state about 1/sqrt(1000)·10 smaller
    g = np.ones((2000, 1))
    paper = run_rule(make_teacher("adam:lr=1.0"), g)
    assert paper[0, 0] == pytest.approx(1.0, rel=1e-6)
    assert paper[-1, 0] == pytest.approx(10 / np.sqrt(1000) / np.sqrt(1 - 0.999**2000) * (1 - 0.9**2000), rel=1e-3)


def test_pool_presets_have_the_papers_values():
    lrs = {t.name: t.hparams["lr"] for t in make_pool("large")}
    assert lrs == {"adam": 0.005, "rmsprop": 0.005, "sgd": 0.2, "momentum": 0.5, "addsign": 0.1, "powersign": 0.1}
    assert [t.name for t in make_pool("small")] == ["adam", "rmsprop"]
    choice = {t.name: t.hparams["lr"] for t in make_pool("choice-large")}
    assert choice == {"sgd": 2.0, "momentum": 2.0, "rmsprop": 0.005, "adam": 0.02, "powersign": 1.0, "addsign": 1.0}
    assert make_pool("choice-small")[0].hparams["eps"] == 1e-7


TEXTBOOK = [
    ("adam-textbook:lr=0.01", lambda p: torch.optim.Adam(p, lr=0.01)),
    ("adam-textbook:lr=0.003,beta1=0.8,beta2=0.99,eps=1e-6",
     lambda p: torch.optim.Adam(p, lr=0.003, betas=(0.8, 0.99), eps=1e-6)),
    ("rmsprop-textbook:lr=0.005,rho=0.9", lambda p: torch.optim.RMSprop(p, lr=0.005, alpha=0.9)),
    ("sgd-textbook:lr=0.2", lambda p: torch.optim.SGD(p, lr=0.2)),
    ("momentum-textbook:lr=0.5,beta=0.9", lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)),
]


@pytest.mark.parametrize("spec,make_torch", TEXTBOOK, ids=[s for s, _ in TEXTBOOK])
def test_textbook_forms_match_torch_optim(spec, make_torch):
    torch.manual_seed(0)
    start = torch.randn(5, 4)
    grads = [torch.randn(5, 4) * 10 ** (i % 3 - 1) for i in range(20)]
    ours = TeacherOptimizer([ours_p := torch.nn.Parameter(start.clone())], make_teacher(spec))
    ref = make_torch([ref_p := torch.nn.Parameter(start.clone())])
    for g in grads:
        for opt, p in ((ours, ours_p), (ref, ref_p)):
            p.grad = g.clone()
            opt.step()
    torch.testing.assert_close(ours_p, ref_p, rtol=1e-6, atol=1e-6)


def test_any_torch_optimizer_is_a_teacher():
    teacher = make_teacher("torch.optim.AdamW:lr=0.01,weight_decay=0.1")
    assert not teacher.differentiable
    start = torch.randn(6)
    ref = torch.optim.AdamW([ref_p := torch.nn.Parameter(start.clone())], lr=0.01, weight_decay=0.1)
    params, state = start.clone(), teacher.init(start)
    for i in range(5):
        g = torch.full((6,), float(i) - 2.0)
        delta, state = teacher.update(g, state)
        params -= delta
        ref_p.grad = g
        ref.step()
    torch.testing.assert_close(params, ref_p.detach(), rtol=1e-6, atol=1e-6)
    assert torch_teacher(torch.optim.SGD, lr=0.1).name == "torch.optim.sgd.SGD"


def test_pools_from_names_and_bad_names():
    pool = make_pool("adam:lr=0.01+sgd:lr=0.3+torch.optim.Adagrad:lr=0.1")
    assert [t.name for t in pool] == ["adam", "sgd", "torch.optim.Adagrad"]
    assert pool[0].hparams["lr"] == 0.01
    with pytest.raises(ValueError, match="preset pools: small, large"):
        make_pool("bogus")
    with pytest.raises(ValueError, match="valid teachers: adam, rmsprop"):
        make_teacher("bogus")
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        make_teacher("torch.nn.Linear")
    with pytest.raises(ValueError, match="bad hyper-parameters"):
        make_teacher("adam:momentum=3")
    assert set(POOLS) >= {"small", "large", "choice-small", "choice-large"}


@pytest.mark.parametrize("name,reason", [("torch.optim.LBFGS", "closure"), ("torch.optim.SparseAdam", "dense")])
def test_optimizers_that_need_a_closure_or_sparse_gradients_are_refused_up_front(name, reason):
    """Teachers and evaluated optimizers step on dense gradients without a closure: refused at the spec, in one
    line, whether as a teacher or as an evaluated optimizer (both resolve through torch_optimizer)."""
    from amalgam_plugin.suite import optimizer_candidate

    for resolve, spec in ((make_teacher, name), (make_pool, f"adam+{name}"), (optimizer_candidate, name)):
        with pytest.raises(ValueError, match=f"{name} cannot be used here.*{reason}") as err:
            resolve(f"{spec}:lr=0.1")
        assert "\n" not in str(err.value) and "unknown pool" not in str(err.value)


def test_a_dotted_name_never_imports_a_module_of_the_working_folder(tmp_path, monkeypatch):
    """A module that only lies in the working folder (first on sys.path, as with ``python -m``) is not imported
    by name, so its top-level code does not run; an installed package's optimizer still resolves."""
    (tmp_path / "evilmod.py").write_text(
        "import pathlib, torch\n"
        "pathlib.Path('ran.txt').write_text('imported')\n"
        "class Opt(torch.optim.SGD):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("evilmod.Opt:lr=0.1", "adam+evilmod.Opt"):
        with pytest.raises(ValueError, match="'evilmod' is not an installed package"):
            make_pool(spec)
    assert not (tmp_path / "ran.txt").exists()
    assert make_teacher("torch.optim.SGD:lr=0.1").name == "torch.optim.SGD"
