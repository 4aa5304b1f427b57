"""What every student shares: the student protocol, the config fields of the runtime protocol, Keras-layout
layers (so the paper's weights load by name) and the Hub mixin, which reads and writes the one folder format
(``students/format.py``) that ``amalgam_plugin.hub`` uses too.

A student is an ``nn.Module`` applied coordinate-wise to flat ``[n]`` tensors (:class:`Student`); its fast
runtime kernel, if it has one, sits beside it and is found through the registry in ``students/__init__.py``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from ..cards import DEFAULT_LR_NOTE, PAPER_URL
from .format import FORMAT_VERSION, write_folder
from .sources import load

State = dict[str, Any]


MAX_UNITS = 256  # per recurrent layer: a downloaded config may not ask for unbounded memory
MAX_LAYERS = 4


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def check_real(name: str, value: Any, low: float, high: float, low_open: bool = False,
               high_open: bool = False) -> None:
    """A finite number in the interval (open at either end when asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def check_sizes(name: str, value: Any) -> None:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_LAYERS:
        raise ValueError(f"{name} must be a list of 1 to {MAX_LAYERS} layer sizes, got {value!r}")
    for i, units in enumerate(value):
        check_int(f"{name}[{i}]", units, 1, MAX_UNITS)


@dataclass
class StudentConfig:
    """The fields every student's config carries beside its architecture: the evaluation protocol it was
    trained for (warm-up, weight-decay unit) and where it came from. Saved as ``config.json``; every field is
    checked (type and range) when a config is made, so a downloaded one cannot build a broken or huge student.

    A student type's config states, once, its ``student_type`` (its key in the registry ``STUDENTS`` and in
    ``config.json``), its ``card_fields`` (the fields its model card shows as the architecture) and its
    ``lr_note`` (what ``lr`` means for it, as its model card says)."""

    student_type: ClassVar[str] = ""
    card_fields: ClassVar[tuple[str, ...]] = ()
    lr_note: ClassVar[str] = DEFAULT_LR_NOTE  # what the optimizer's ``lr`` means, for the model card

    warmup_steps: int = 100
    warmup_lr: float = 0.05
    decay_ref_lr: float = 1e-3
    format_version: int = FORMAT_VERSION
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field out of its type or range."""
        check_int("warmup_steps", self.warmup_steps, 0, 10**9)
        check_real("warmup_lr", self.warmup_lr, 0.0, 100.0)
        check_real("decay_ref_lr", self.decay_ref_lr, 0.0, 1.0)
        check_int("format_version", self.format_version, 1, FORMAT_VERSION)
        if not isinstance(self.provenance, dict):
            raise ValueError(f"provenance must be a JSON object, got {type(self.provenance).__name__}")


class Student(Protocol):
    """A learned optimizer applied coordinate-wise: every scalar of every tensor is one row of the batch."""

    config_class: ClassVar[type[StudentConfig]]  # its student_type and card fields are the type's
    config: StudentConfig

    def init_state(self, n: int, like: Tensor) -> State:
        """The state of ``n`` fresh coordinates (tensors shaped like ``like``'s dtype and device)."""

    def warmup_step(self, grad: Tensor, state: State) -> State:
        """The state update of a warm-up step (plain SGD moves the parameters; recurrent state stays frozen)."""

    def forward(self, grad: Tensor, state: State, rank: int | Tensor) -> tuple[Tensor, State]:
        """``(Δ, new_state)`` for flat ``grad``; the parameter moves by ``-Δ``. ``rank``: the tensor's rank
        (an int, or one per coordinate), for students with per-tensor features."""


class HubStudent(
    PyTorchModelHubMixin,
    library_name="amalgam-plugin",
    tags=["optimizer", "learned-optimizer", "optimizer-amalgamation", "pytorch"],
    license="mit",
    paper_url=PAPER_URL,
    repo_url="https://github.com/VITA-Group/OptimizerAmalgamation",
):
    """huggingface_hub's mixin over the one Hub format: ``save_pretrained`` / ``push_to_hub`` write what
    ``hub.save_student`` writes, and ``from_pretrained`` is ``hub.load_student`` (strict, validated) restricted to
    this class."""

    config_class: ClassVar[type[StudentConfig]]

    @property
    def student_type(self) -> str:
        return self.config.student_type

    def _save_pretrained(self, save_directory: os.PathLike) -> None:
        write_folder(self, save_directory)

    @classmethod
    def _this_class(cls, student_type: Any, where: str) -> type[nn.Module]:
        if student_type != cls.config_class.student_type:
            raise ValueError(f"{where} holds a {student_type!r} student, not a {cls.config_class.student_type!r} "
                             "one; load it with amalgam_plugin.hub.load_student")
        return cls

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ):
        """A frozen student from a folder, a bundled name or a Hub repo id (as ``amalgam_plugin.hub.load_student``);
        a ``ValueError`` when it holds another student type than ``cls``."""
        return load(pretrained_model_name_or_path, cls._this_class, revision, cache_dir, local_files_only)


def glorot_uniform_(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    fan_in, fan_out = weight.shape[0], weight.shape[1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return weight.uniform_(-limit, limit, generator=generator)


def orthogonal_(weight: Tensor, generator: torch.Generator | None) -> Tensor:
    rows, cols = weight.shape
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))
    q = q if rows >= cols else q.T
    with torch.no_grad():
        return weight.copy_(q[:rows, :cols].to(weight.dtype))


def fast_tanh(x: Tensor) -> Tensor:
    """tanh(x) = 2·sigmoid(2x) − 1: the same function, but torch's CPU tanh is ~8x slower than its sigmoid."""
    return torch.sigmoid(2 * x) * 2 - 1


class KerasLSTMCell(nn.Module):
    """An LSTM cell in Keras layout: kernel [in, 4u], recurrent_kernel [u, 4u], one bias, gates i, f, c, o."""

    def __init__(self, input_size: int, units: int):
        super().__init__()
        self.units = units
        self.kernel = nn.Parameter(torch.empty(input_size, 4 * units))
        self.recurrent_kernel = nn.Parameter(torch.empty(units, 4 * units))
        self.bias = nn.Parameter(torch.zeros(4 * units))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        glorot_uniform_(self.kernel, generator)
        orthogonal_(self.recurrent_kernel, generator)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.units : 2 * self.units] = 1.0  # unit_forget_bias

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        z = torch.addmm(self.bias, x, self.kernel) + h @ self.recurrent_kernel
        i, f, g, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * fast_tanh(g)
        return torch.sigmoid(o) * fast_tanh(c), c


class Dense(nn.Module):
    """A Keras Dense layer: kernel [in, out], bias [out]."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(input_size, output_size))
        self.bias = nn.Parameter(torch.zeros(output_size))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        glorot_uniform_(self.kernel, generator)
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x, self.kernel)


def lstm_stack(sizes: list[int], input_size: int) -> nn.ModuleList:
    cells, width = [], input_size
    for units in sizes:
        cells.append(KerasLSTMCell(width, units))
        width = units
    return nn.ModuleList(cells)


def zero_lstm_state(sizes: list[int], n: int, like: Tensor) -> dict[str, Tensor]:
    state = {}
    for layer, units in enumerate(sizes):
        state[f"h{layer}"] = like.new_zeros(n, units)
        state[f"c{layer}"] = like.new_zeros(n, units)
    return state


def run_lstm_stack(cells: nn.ModuleList, x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    new_state = {}
    for layer, cell in enumerate(cells):
        x, c = cell(x, state[f"h{layer}"], state[f"c{layer}"])
        new_state[f"h{layer}"], new_state[f"c{layer}"] = x, c
    return x, new_state
