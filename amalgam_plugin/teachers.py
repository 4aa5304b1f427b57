"""Teacher optimizers as pure, differentiable per-coordinate rules (docs/method.md#teachers).

A teacher is ``init(param) -> state`` and ``update(grad, state) -> (delta, new_state)``; the parameter moves
by ``-delta``.  Most act coordinate by coordinate on a flat vector; a *tensorwise* teacher (the modern pool's:
weight decay, factored moments, orthogonalization) also reads the current parameters and the tensors' shapes,
which its caller puts into the state before every update (``in_context``).  The *paper* forms copy the authors'
l2o code (constant bias correction, epsilon inside the square root, EMA momentum, smooth AddSign/PowerSign); the
*textbook* and *modern* forms match ``torch.optim`` (Lion: its paper).  Any ``torch.optim.Optimizer`` class can
also be a teacher: it runs for real on its own copy of the parameters.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import modern_rules
from .registry import Registry

State = dict[str, Any]


@dataclass(frozen=True)
class Teacher:
    """A named update rule with its hyper-parameters (like optax's GradientTransformation)."""

    name: str
    init: Callable[[Tensor], State]
    update: Callable[[Tensor, State], tuple[Tensor, State]]
    hparams: dict = field(default_factory=dict)
    differentiable: bool = True
    # the state update of a warm-up step, when it differs from ``update`` (learned teachers freeze their LSTM)
    warmup: Callable[[Tensor, State], State] | None = None
    ranked: bool = False  # its state needs the coordinates' tensor ranks ("ranks"), set at a trajectory's start
    tensorwise: bool = False  # its update reads "params" and "shapes" from its state (``in_context``)
    # a ValueError for a set of tensors it cannot act on, raised before any step (``check_tensors``)
    check_shapes: Callable[[list[tuple[int, ...]]], None] | None = None

    def warmup_step(self, grad: Tensor, state: State) -> State:
        return self.warmup(grad, state) if self.warmup is not None else self.update(grad, state)[1]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return f"{self.name}({args})"


def in_context(rule: Any, state: State, params: Tensor, shapes: Sequence[tuple[int, ...]]) -> State:
    """``state`` as a tensorwise rule (a teacher, or a student over tensorwise teachers) reads it at an update:
    with the current parameters (flat, in the rule's own coordinates) and the shapes of the tensors they join."""
    if not getattr(rule, "tensorwise", False):
        return state
    return {**state, "params": params, "shapes": [tuple(int(d) for d in s) for s in shapes]}


def check_tensors(rules: Sequence[Any], shapes: Sequence[tuple[int, ...]]) -> None:
    """A ValueError from the first rule (a teacher, or a student over teachers) that cannot act on tensors of
    these shapes, e.g. Muon on vectors alone."""
    for rule in rules:
        if getattr(rule, "check_shapes", None) is not None:
            rule.check_shapes([tuple(int(d) for d in s) for s in shapes])


def _ema(old: Tensor, new: Tensor, beta: float) -> Tensor:
    return beta * old + (1.0 - beta) * new


def _zeros(*keys: str) -> Callable[[Tensor], State]:
    return lambda p: {k: torch.zeros_like(p) for k in keys}


def _sign_agreement(g: Tensor, m: Tensor, v: Tensor, eps: float) -> Tensor:
    """tanh(g/√(v+ε))·tanh(m/√(v+ε)): l2o's smooth stand-in for sign(g)·sign(m)."""
    denom = torch.sqrt(v + eps)
    return torch.tanh(g / denom) * torch.tanh(m / denom)


# --- the paper's forms (l2o: policies/analytical.py) -------------------------------------------------------


def adam(lr: float = 0.005, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-10) -> Teacher:
    """Δ = lr · (m/(1−β1)) / √(v/(1−β2) + ε): constant bias correction, ε inside the root."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        m, v = _ema(s["m"], g, beta1), _ema(s["v"], g * g, beta2)
        return lr * (m / (1 - beta1)) / torch.sqrt(v / (1 - beta2) + eps), {"m": m, "v": v}

    return Teacher("adam", _zeros("m", "v"), update, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))


def rmsprop(lr: float = 0.005, rho: float = 0.9, eps: float = 1e-10) -> Teacher:
    """Δ = lr · g / √(ms + ε), no bias correction, no momentum."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        ms = _ema(s["ms"], g * g, rho)
        return lr * g / torch.sqrt(ms + eps), {"ms": ms}

    return Teacher("rmsprop", _zeros("ms"), update, dict(lr=lr, rho=rho, eps=eps))


def sgd(lr: float = 0.2) -> Teacher:
    return Teacher("sgd", lambda p: {}, lambda g, s: (lr * g, s), dict(lr=lr))


def momentum(lr: float = 0.5, beta: float = 0.9) -> Teacher:
    """EMA momentum: m ← βm + (1−β)g; Δ = lr · m (10x smaller than torch's momentum at equal lr)."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        m = _ema(s["m"], g, beta)
        return lr * m, {"m": m}

    return Teacher("momentum", _zeros("m"), update, dict(lr=lr, beta=beta))


def addsign(lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-10) -> Teacher:
    """Δ = lr · (1 + tanh(g/√(v+ε))·tanh(m/√(v+ε))) · g."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        m, v = _ema(s["m"], g, beta1), _ema(s["v"], g * g, beta2)
        return lr * (1 + _sign_agreement(g, m, v, eps)) * g, {"m": m, "v": v}

    return Teacher("addsign", _zeros("m", "v"), update, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))


def powersign(lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-10) -> Teacher:
    """Δ = lr · exp(tanh(g/√(v+ε))·tanh(m/√(v+ε))) · g."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        m, v = _ema(s["m"], g, beta1), _ema(s["v"], g * g, beta2)
        return lr * torch.exp(_sign_agreement(g, m, v, eps)) * g, {"m": m, "v": v}

    return Teacher("powersign", _zeros("m", "v"), update, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))


# --- textbook forms (identical to torch.optim; checked against it in the tests) -----------------------------


def adam_textbook(lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> Teacher:
    """torch.optim.Adam: bias correction 1−β^t, ε outside the root."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        t = s["step"] + 1
        m, v = _ema(s["m"], g, beta1), _ema(s["v"], g * g, beta2)
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
        return lr * m_hat / (torch.sqrt(v_hat) + eps), {"m": m, "v": v, "step": t}

    def init(p: Tensor) -> State:
        return {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "step": 0}

    return Teacher("adam-textbook", init, update, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps))


def rmsprop_textbook(lr: float = 1e-2, rho: float = 0.99, eps: float = 1e-8) -> Teacher:
    """torch.optim.RMSprop(alpha=rho): Δ = lr · g / (√v + ε)."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        v = _ema(s["v"], g * g, rho)
        return lr * g / (torch.sqrt(v) + eps), {"v": v}

    return Teacher("rmsprop-textbook", _zeros("v"), update, dict(lr=lr, rho=rho, eps=eps))


def momentum_textbook(lr: float = 0.01, beta: float = 0.9) -> Teacher:
    """torch.optim.SGD(momentum=beta): b ← βb + g (b = g on the first step); Δ = lr · b."""

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        b = g.clone() if s["b"] is None else beta * s["b"] + g
        return lr * b, {"b": b}

    return Teacher("momentum-textbook", lambda p: {"b": None}, update, dict(lr=lr, beta=beta))


def sgd_textbook(lr: float = 0.2) -> Teacher:
    return Teacher("sgd-textbook", lambda p: {}, lambda g, s: (lr * g, s), dict(lr=lr))


# --- the modern pool's forms (torch.optim.AdamW, Adafactor, Muon; Lion from its paper) ------------------------


def adamw(lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01) -> Teacher:
    """torch.optim.AdamW: Δ = lr·wd·θ + lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε), with √0's slope taken as 0 (a
    coordinate that never had a gradient would make the meta-gradient NaN)."""
    modern_rules.check("adamw", dict(lr=lr, eps=eps), dict(weight_decay=weight_decay), dict(beta1=beta1, beta2=beta2))

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        t = s["step"] + 1
        m, v = _ema(s["m"], g, beta1), _ema(s["v"], g * g, beta2)
        denom = modern_rules.sqrt0(v) / math.sqrt(1 - beta2**t) + eps
        delta = lr / (1 - beta1**t) * m / denom + modern_rules.decay(s["params"], lr, weight_decay)
        return delta, {"m": m, "v": v, "step": t}

    def init(p: Tensor) -> State:
        return {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "step": 0}

    return Teacher("adamw", init, update, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay),
                   tensorwise=True)


def lion(lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.99, weight_decay: float = 0.0) -> Teacher:
    """Lion (Chen et al. 2023): Δ = lr·wd·θ + lr · sign(β1·m + (1−β1)·g); then m ← β2·m + (1−β2)·g."""
    modern_rules.check("lion", dict(lr=lr), dict(weight_decay=weight_decay), dict(beta1=beta1, beta2=beta2))

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        direction = torch.sign(_ema(s["m"], g, beta1))
        return lr * direction + modern_rules.decay(s["params"], lr, weight_decay), {"m": _ema(s["m"], g, beta2)}

    return Teacher("lion", _zeros("m"), update, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay),
                   tensorwise=True)


def adafactor(lr: float = 1e-2, beta2_decay: float = -0.8, eps1: float | None = None, eps2: float = 1e-3,
              d: float = 1.0, weight_decay: float = 0.0) -> Teacher:
    """torch.optim.Adafactor, per tensor (``modern_rules.adafactor_step``); ``eps1`` None: the dtype's machine
    epsilon, as torch."""
    modern_rules.check("adafactor", dict(lr=lr, eps2=eps2, **({} if eps1 is None else dict(eps1=eps1))),
                       dict(weight_decay=weight_decay))
    if not (d >= 1 and beta2_decay <= 0):
        raise ValueError(f"teacher 'adafactor': needs d >= 1 and beta2_decay <= 0, got d={d!r}, "
                         f"beta2_decay={beta2_decay!r}")
    hparams = dict(lr=lr, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2, d=d, weight_decay=weight_decay)

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        t, shapes = s["step"] + 1, s["shapes"]
        moments = s["moments"] or [modern_rules.adafactor_moments(shape, g) for shape in shapes]
        steps = [modern_rules.adafactor_step(gi, pi, mi, t, **hparams) for gi, pi, mi in
                 zip(modern_rules.split(g, shapes), modern_rules.split(s["params"], shapes), moments, strict=True)]
        return modern_rules.join([d for d, _ in steps]), {"step": t, "moments": [m for _, m in steps]}

    return Teacher("adafactor", lambda p: {"step": 0, "moments": None}, update,
                   {k: v for k, v in hparams.items() if v is not None}, tensorwise=True)


def muon(lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.1, ns_steps: int = 5,
         adamw_lr: float = 1e-3, adamw_weight_decay: float = 0.01) -> Teacher:
    """torch.optim.Muon (``modern_rules.muon_step``) on each tensor of rank >= 2 as the matrix [shape[0], rest]
    (a conv kernel as Keller Jordan's Muon takes it), and AdamW (torch's defaults but ``adamw_lr`` and
    ``adamw_weight_decay``) on the tensors of rank <= 1, as the Muon authors pair them. A ValueError where no
    tensor has rank >= 2 (``check_tensors``): nothing for Muon to act on."""
    modern_rules.check("muon", dict(lr=lr, adamw_lr=adamw_lr), dict(weight_decay=weight_decay),
                       dict(momentum=momentum))
    if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps <= 99:
        raise ValueError(f"teacher 'muon': ns_steps={ns_steps!r} must be an integer in [1, 99]")
    fallback = adamw(adamw_lr, weight_decay=adamw_weight_decay)

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        shapes = s["shapes"]
        states = s["tensors"] or [g.new_zeros(shape) if len(shape) >= 2 else fallback.init(g.new_zeros(shape))
                                  for shape in shapes]
        steps = [modern_rules.muon_step(gi, pi, si, lr, momentum, weight_decay, ns_steps) if gi.dim() >= 2
                 else fallback.update(gi, {**si, "params": pi})
                 for gi, pi, si in zip(modern_rules.split(g, shapes), modern_rules.split(s["params"], shapes), states,
                                       strict=True)]
        return modern_rules.join([d for d, _ in steps]), {"tensors": [t for _, t in steps]}

    return Teacher("muon", lambda p: {"tensors": None}, update,
                   dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, adamw_lr=adamw_lr,
                        adamw_weight_decay=adamw_weight_decay), tensorwise=True, check_shapes=modern_rules.check_matrix)


# --- any torch optimizer -----------------------------------------------------------------------------------


def torch_teacher(optimizer_cls: type[torch.optim.Optimizer], name: str | None = None, **kwargs: Any) -> Teacher:
    """Run a real ``torch.optim.Optimizer`` on its own copy of each parameter tensor.

    Its update is read off as ``before - after``.  Not differentiable: use it where no gradient flows
    through the teacher (imitation targets).
    """

    def init(p: Tensor) -> State:
        copy = torch.nn.Parameter(p.detach().clone())
        return {"param": copy, "optimizer": optimizer_cls([copy], **kwargs)}

    def update(g: Tensor, s: State) -> tuple[Tensor, State]:
        copy = s["param"]
        before = copy.detach().clone()
        copy.grad = g.detach().to(copy.dtype)
        s["optimizer"].step()
        return before - copy.detach(), s

    label = name or f"{optimizer_cls.__module__}.{optimizer_cls.__qualname__}"
    return Teacher(label, init, update, dict(kwargs), differentiable=False)


# --- the registries of named teachers and pools --------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherRule:
    """A registry entry: the rule's factory (its hyper-parameters as keyword arguments, the Teacher out)."""

    make: Callable[..., Teacher]


TEACHERS: Registry[TeacherRule] = Registry("teacher", {
    "adam": (TeacherRule(adam), "paper form: constant bias correction, ε inside the root"),
    "rmsprop": (TeacherRule(rmsprop), "paper form: no bias correction, no momentum"),
    "sgd": (TeacherRule(sgd), "plain gradient descent"),
    "momentum": (TeacherRule(momentum), "paper form: EMA momentum, 10x smaller than torch's at equal lr"),
    "addsign": (TeacherRule(addsign), "paper form: smooth AddSign"),
    "powersign": (TeacherRule(powersign), "paper form: smooth PowerSign"),
    "adam-textbook": (TeacherRule(adam_textbook), "torch.optim.Adam"),
    "rmsprop-textbook": (TeacherRule(rmsprop_textbook), "torch.optim.RMSprop"),
    "sgd-textbook": (TeacherRule(sgd_textbook), "torch.optim.SGD"),
    "momentum-textbook": (TeacherRule(momentum_textbook), "torch.optim.SGD(momentum=beta)"),
    "adamw": (TeacherRule(adamw), "torch.optim.AdamW (decoupled weight decay)"),
    "lion": (TeacherRule(lion), "Lion (Chen et al. 2023): the sign of an interpolated momentum"),
    "adafactor": (TeacherRule(adafactor), "torch.optim.Adafactor (factored second moment, relative step)"),
    "muon": (TeacherRule(muon), "torch.optim.Muon on tensors of rank >= 2, AdamW on the rest"),
})


@dataclass(frozen=True)
class Pool:
    """A registry entry: the pool's members as ``(teacher name, hyper-parameters)`` pairs."""

    members: tuple[tuple[str, dict], ...]

    def teachers(self) -> list[Teacher]:
        return [TEACHERS[name].make(**kw) for name, kw in self.members]


# Pools with the paper's hyper-parameters (docs/method.md#teachers, #choice-pools), and the modern pool.
POOLS: Registry[Pool] = Registry("pool", {
    "small": (Pool((("adam", dict(lr=0.005)), ("rmsprop", dict(lr=0.005)))), "Adam 0.005, RMSProp 0.005"),
    "large": (Pool((
        ("adam", dict(lr=0.005)),
        ("rmsprop", dict(lr=0.005)),
        ("sgd", dict(lr=0.2)),
        ("momentum", dict(lr=0.5)),
        ("addsign", dict(lr=0.1)),
        ("powersign", dict(lr=0.1)),
    )), "small + SGD 0.2, Momentum 0.5, AddSign 0.1, PowerSign 0.1"),
    "choice-small": (Pool((("rmsprop", dict(lr=0.005, eps=1e-7)), ("adam", dict(lr=0.02)))),
                     "the small choice network's own pool"),
    "choice-large": (Pool((
        ("sgd", dict(lr=2.0)),
        ("momentum", dict(lr=2.0)),
        ("rmsprop", dict(lr=0.005, eps=1e-7)),
        ("adam", dict(lr=0.02)),
        ("powersign", dict(lr=1.0)),
        ("addsign", dict(lr=1.0)),
    )), "the large choice network's own pool"),
    # lrs by a sweep on Train's training loss (docs/method.md#modern-pool); the rest torch's (Lion: its paper's)
    "modern": (Pool((
        ("adamw", dict(lr=0.01)),
        ("lion", dict(lr=0.003)),
        ("adafactor", dict(lr=0.3)),
        ("muon", dict(lr=0.02, adamw_lr=0.01)),
    )), "AdamW 0.01, Lion 0.003, Adafactor 0.3, Muon 0.02 (AdamW 0.01 on tensors of rank <= 1)"),
})


def parse_value(text: str) -> Any:
    """A textual option value (``key=value`` specs) as None, bool, int, float or the string itself."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _installed(module_name: str) -> bool:
    """Whether importing ``module_name`` runs only code of an installed distribution (or nothing new): a module
    that merely lies in the working folder or on ``PYTHONPATH`` is not imported by name."""
    top = module_name.partition(".")[0]
    return top in sys.modules or top in importlib.metadata.packages_distributions()


def _import_optimizer(path: str) -> type[torch.optim.Optimizer]:
    module_name, _, attr = path.rpartition(".")
    if module_name and not _installed(module_name):
        raise ValueError(f"cannot import optimizer class {path!r}: {module_name.partition('.')[0]!r} is not an "
                         "installed package (modules of the working folder are not imported by name); install it, "
                         "or pass the class itself: torch_teacher(cls) or an optimizer factory")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import optimizer class {path!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass")
    return cls


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` as ``(name, {key: value})``."""
    name, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"argument {item!r} in {spec!r} is not of the form key=value")
        kwargs[key.strip()] = parse_value(value.strip())
    return name.strip(), kwargs


def torch_optimizer(name: str, kwargs: dict[str, Any]) -> type[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` class at dotted ``name``, checked now rather than at its first step: its
    arguments by the class itself, and that it can step as teachers and evaluations step it, with a dense
    gradient and no closure (which refuses LBFGS, whose step needs a closure, and SparseAdam, which needs sparse
    gradients, and any other optimizer with either need)."""
    cls = _import_optimizer(name)
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = cls([probe], **kwargs)
    except Exception as err:  # noqa: BLE001 (any class's own complaint about its arguments)
        raise ValueError(f"bad arguments for {name}: {err}") from err
    probe.grad = torch.ones(1)
    try:
        optimizer.step()
    except Exception as err:  # noqa: BLE001 (the class's own reason; a missing closure is a TypeError)
        raise ValueError(f"{name} cannot be used here: it must step on a dense gradient without a closure, as "
                         f"teachers and evaluated optimizers do ({err})") from err
    return cls


def make_teacher(spec: str) -> Teacher:
    """``"adam"``, ``"adam:lr=0.01,beta1=0.8"``, or a dotted optimizer class ``"torch.optim.AdamW:lr=1e-3"``."""
    name, kwargs = parse_spec(spec)
    if "." in name:
        return torch_teacher(torch_optimizer(name, kwargs), name=name, **kwargs)
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; valid teachers: {TEACHERS.valid()}, "
                         "or a dotted torch.optim.Optimizer class such as torch.optim.AdamW")
    for key, value in kwargs.items():  # every named teacher's hyper-parameters are numbers
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"teacher {name!r}: {key}={value!r} is not a finite number")
    try:
        return TEACHERS[name].make(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad hyper-parameters for teacher {name!r}: {err}") from err


def make_pool(spec: str | Sequence[str | Teacher]) -> list[Teacher]:
    """A preset pool name (``small``, ``large``, ``choice-small``, ``choice-large``), a ``+``-separated list
    of teacher specs (``"adam:lr=0.01+sgd"``), or a sequence of specs or Teachers."""
    if isinstance(spec, str):
        if spec in POOLS:
            return POOLS[spec].teachers()
        parts = [s for s in spec.split("+") if s.strip()]
        if not parts:
            raise ValueError(f"empty pool {spec!r}")
        try:
            return [make_teacher(s) for s in parts]
        except ValueError as err:
            if len(parts) > 1:  # a list of teachers, one of them bad: no preset name was meant
                raise ValueError(f"pool {spec!r}: {err}") from err
            raise ValueError(f"unknown pool {spec!r} ({err}); preset pools: {POOLS.valid()}") from err
    return [t if isinstance(t, Teacher) else make_teacher(t) for t in spec]


def pool_spec(pool: Sequence[Teacher]) -> list[dict]:
    """A JSON description of a pool, for configs and model cards."""
    return [{"name": t.name, **t.hparams} for t in pool]


class TeacherOptimizer(torch.optim.Optimizer):
    """A teacher rule as a ``torch.optim.Optimizer``, for evaluating the paper's forms in ordinary loops."""

    def __init__(self, params, teacher: Teacher):
        super().__init__(params, dict(lr=1.0))
        self.teacher = teacher
        check_tensors([teacher], [p.shape for group in self.param_groups for p in group["params"]])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                # a tensorwise teacher gets the tensor flat (its state too), with its values and shape (``in_context``)
                flat = self.teacher.tensorwise
                if "rule" not in state:
                    state["rule"] = self.teacher.init(p.reshape(-1) if flat else p)
                rule = in_context(self.teacher, state["rule"], p.reshape(-1), [p.shape])
                delta, state["rule"] = self.teacher.update(p.grad.reshape(-1) if flat else p.grad, rule)
                p.sub_(group["lr"] * delta.view_as(p))
        return loss
