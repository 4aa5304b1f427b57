"""``timm.optim.create_optimizer_v2(model, opt="amalgam")``.

Importing this module (or calling :func:`amalgam_plugin.integrations.register`) registers, idempotently,
in timm's optimizer registry (``timm.optim._optim_factory.default_registry``):

- ``amalgam``: :class:`~amalgam_plugin.optim.AmalgamOptimizer` with its default student;
- one hyphenated name per bundled student family (timm splits names on ``_``): ``amalgam-choice-large``,
  ``amalgam-choice-small``, ``amalgam-minmax``, ``amalgam-mean`` (the paper's) and ``amalgam-normalized``
  (``normalized-choice-modern-sketch``).

Usage::

    import amalgam_plugin.integrations.timm  # noqa: F401
    optimizer = timm.optim.create_optimizer_v2(model, opt="amalgam", lr=5e-4, weight_decay=0.05)

A normalized student's ``lr`` is AdamW's: every group starts at timm's ``lr`` (the student's default when timm gives
none) times ``lr_multiplier``. For any other student timm's ``lr`` value is ignored with one log line (it is tuned
for AdamW) and every group starts at ``lr = 1.0 * lr_multiplier`` (``create_optimizer_v2(..., lr_multiplier=0.5)``).
timm's schedulers scale it either way. timm's weight-decay groups (AdamW units), ``use_fallback`` groups
(``fallback_list=``; they run AdamW at ``fallback_lr``, scaled with the group ``lr``) and ``lr_scale`` keys (applied by
timm's schedulers, not the optimizer) are passed through. Other keyword arguments (``student=``, ``warmup_steps=``,
``fallback_lr=``...) go to ``AmalgamOptimizer``. A script that builds its optimizer with ``create_optimizer_v2`` (as
timm's ``train.py`` does) can run unmodified through ``amalgam run SCRIPT.py --opt amalgam ...``, which registers
these names first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import timm
from amalgam_plugin.integrations import UnsupportedLibraryError
from amalgam_plugin.integrations._common import framework_student
from torch.optim import Optimizer

from amalgam_plugin.registry import Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimmName:
    """A registry entry: the bundled student a timm optimizer name runs (``None``: AmalgamOptimizer's default)."""

    student: str | None


TIMM_NAMES: Registry[TimmName] = Registry("timm optimizer name", {
    "amalgam": (TimmName(None), "the default student"),
    "amalgam-choice-large": (TimmName("paper-choice-large"), "the paper's choice amalgamation of the large pool"),
    "amalgam-choice-small": (TimmName("paper-choice-small"), "the paper's choice amalgamation of the small pool"),
    "amalgam-minmax": (TimmName("paper-minmax"), "the paper's min-max amalgamation"),
    "amalgam-mean": (TimmName("paper-mean"), "the paper's mean amalgamation"),
    "amalgam-normalized": (TimmName("normalized-choice-modern-sketch"),
                           "the normalized student with its harness (lr is AdamW's)"),
})


def create_amalgam_optimizer(
    params: Any, lr: float | None = None, lr_multiplier: float = 1.0, **kwargs: Any
) -> Optimizer:
    """timm's ``opt_class`` for the amalgam names: ``AmalgamOptimizer(params, lr=..., ...)`` with the group ``lr``
    of :func:`~amalgam_plugin.integrations._common.framework_student` (timm's ``lr`` for a normalized student,
    ``1.0 * lr_multiplier`` for any other)."""
    from amalgam_plugin.optim import AmalgamOptimizer
    from amalgam_plugin.students.sources import DEFAULT_STUDENT

    student, group_lr = framework_student("timm", kwargs.pop("student", DEFAULT_STUDENT), kwargs.pop("revision", None),
                                          lr, lr_multiplier)
    return AmalgamOptimizer(params, student=student, lr=group_lr, **kwargs)


def _registry() -> tuple[Any, type]:
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError as err:
        raise UnsupportedLibraryError(
            f"cannot register 'amalgam' with timm {timm.__version__}: timm.optim._optim_factory has no "
            f"default_registry/OptimInfo ({err}); build the optimizer directly: "
            "AmalgamOptimizer(timm.optim.param_groups_weight_decay(model, weight_decay), lr=1.0)"
        ) from err
    return default_registry, OptimInfo


def register() -> None:
    """Add the amalgam names to timm's default optimizer registry; idempotent.

    Raises:
        UnsupportedLibraryError: the installed timm has no optimizer registry.
    """
    registry, optim_info = _registry()
    for name, entry in TIMM_NAMES.items():
        student = entry.student
        info = optim_info(
            name=name,
            opt_class=create_amalgam_optimizer,
            description=(
                "Optimizer Amalgamation: a learned student optimizer "
                + (f"({student})" if student else "(the default student)")
                + "; lr is AdamW's for a normalized student, else a multiplier on the student's update"
            ),
            has_eps=False,
            has_momentum=False,
            has_betas=False,
            defaults={"student": student} if student else None,
        )
        try:
            current = registry.get_optimizer_info(name)
        except ValueError:
            current = None
        if current != info:
            registry.register(info)
    logger.debug("registered %s with timm %s", list(TIMM_NAMES), timm.__version__)


register()

__all__ = ["TIMM_NAMES", "TimmName", "create_amalgam_optimizer", "register"]
