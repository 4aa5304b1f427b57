"""``TrainingArguments(optim="amalgam")`` for the stock transformers ``Trainer``.

Importing this module (or calling :func:`amalgam_plugin.integrations.register`) registers, idempotently:

- ``"amalgam"`` as a member of ``transformers.training_args.OptimizerNames``, so
  ``TrainingArguments(optim="amalgam")``, ``HfArgumentParser``'s ``--optim amalgam`` and pickled
  ``training_args.bin`` work (loading such a pickle needs this module imported first);
- a handler in ``transformers.trainer_optimizer._OPTIMIZER_HANDLERS`` that builds
  :class:`~amalgam_plugin.optim.AmalgamOptimizer` on the Trainer's decay / no-decay groups.

Usage::

    import amalgam_plugin.integrations.transformers  # noqa: F401  (registers "amalgam")
    args = TrainingArguments(output_dir="out", optim="amalgam",
                             optim_args="student=paper-choice-large,lr_multiplier=1.0,fallback=embeddings+norms")
    Trainer(model=model, args=args, train_dataset=ds).train()

``optim_args`` keys: every keyword of ``AmalgamOptimizer`` (``student``, ``warmup_steps``, ``fallback_lr``,
``maximize``, ...) plus ``lr_multiplier`` and ``fallback`` (categories ``embeddings``, ``norms``, ``biases``,
``1d``, ``all`` or glob patterns on parameter names, joined with ``+``; those parameters run AdamW at
``fallback_lr``, scaled with the group ``lr``). A normalized student's ``lr`` is AdamW's: the group ``lr`` is
``learning_rate * lr_multiplier``. Any other student's ``lr`` multiplies its update as trained: the group ``lr``
is ``1.0 * lr_multiplier`` and ``learning_rate`` is ignored with one log line, because its value is tuned for
AdamW. The Trainer's schedule (warm-up, cosine...) scales the group ``lr`` either way. ``weight_decay`` is
passed on (AmalgamOptimizer takes it in AdamW units).

This relies on transformers internals (``_OPTIMIZER_HANDLERS``, the enum's private maps; checked on 5.x,
Python 3.10-3.13). Where they differ, registration raises
:class:`~amalgam_plugin.integrations.UnsupportedLibraryError`.
The **stable route**, public API only and working on any version, is::

    from amalgam_plugin.optim import AmalgamOptimizer
    trainer = Trainer(
        model=model, args=args, train_dataset=ds,
        optimizer_cls_and_kwargs=(AmalgamOptimizer, {"lr": 1.0, "student": "paper-choice-large"}),
    )

(``args.optim`` is then ignored; the Trainer still passes its weight-decay groups.)
"""

from __future__ import annotations

import logging
from typing import Any

import transformers
from amalgam_plugin.integrations import UnsupportedLibraryError
from amalgam_plugin.integrations._common import framework_student, parse_options, select_fallback
from torch import nn

logger = logging.getLogger(__name__)

OPTIM_NAME = "amalgam"
MEMBER_NAME = "AMALGAM"
STABLE_ROUTE = (
    "use the stable route instead: Trainer(..., optimizer_cls_and_kwargs=(AmalgamOptimizer, "
    "{'lr': 1.0, 'student': 'paper-choice-large'})) with `from amalgam_plugin.optim import AmalgamOptimizer`"
)
#: optim_args keys handled here rather than passed to AmalgamOptimizer.
INTEGRATION_OPTIONS = ("lr_multiplier", "fallback")


def _unsupported(reason: str) -> UnsupportedLibraryError:
    return UnsupportedLibraryError(
        f"cannot register optim='{OPTIM_NAME}' with transformers {transformers.__version__}: {reason}; {STABLE_ROUTE}"
    )


def _internals() -> tuple[type, dict]:
    """``(OptimizerNames, _OPTIMIZER_HANDLERS)``, checked to have the layout registration relies on."""
    try:
        from transformers import trainer_optimizer, training_args
    except ImportError as err:
        raise _unsupported(f"transformers.trainer_optimizer is not importable ({err})") from err
    names = getattr(training_args, "OptimizerNames", None)
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    check_internals(names, handlers)
    return names, handlers


def check_internals(names: Any, handlers: Any) -> None:
    """Raise :class:`UnsupportedLibraryError` unless ``names`` is a str Enum with Python's private member
    maps and ``handlers`` is a dict keyed by its members (transformers 5.x)."""
    if not isinstance(handlers, dict):
        raise _unsupported("transformers.trainer_optimizer._OPTIMIZER_HANDLERS (a dict of handlers) is missing")
    maps = ("_member_map_", "_value2member_map_", "_member_names_")
    if not (isinstance(names, type) and issubclass(names, str) and all(hasattr(names, m) for m in maps)):
        raise _unsupported("training_args.OptimizerNames is not a str Enum with the standard member maps")
    if not isinstance(names._member_map_, dict) or not isinstance(names._value2member_map_, dict):
        raise _unsupported("OptimizerNames' member maps are not dicts")
    if "adamw_torch" not in names._value2member_map_ or "adamw_torch" not in handlers:
        raise _unsupported("OptimizerNames / _OPTIMIZER_HANDLERS do not list 'adamw_torch'")


def _add_enum_member(names: type) -> Any:
    """Add the ``AMALGAM = "amalgam"`` member to the closed enum: transformers accepts no other names for optim."""
    existing = names._value2member_map_.get(OPTIM_NAME)
    if existing is not None:
        return existing
    member = str.__new__(names, OPTIM_NAME)
    member._name_, member._value_ = MEMBER_NAME, OPTIM_NAME
    member.__objclass__ = names
    member._sort_order_ = len(names._member_names_)
    if hasattr(names, "_add_member_"):  # Python >= 3.13 also installs the class attribute
        names._add_member_(MEMBER_NAME, member)
    else:
        names._member_map_[MEMBER_NAME] = member
        type.__setattr__(names, MEMBER_NAME, member)
    names._value2member_map_[OPTIM_NAME] = member
    if MEMBER_NAME not in names._member_names_:
        names._member_names_.append(MEMBER_NAME)
    if names(OPTIM_NAME) is not member or member not in list(names):
        raise _unsupported("adding a member to OptimizerNames did not take effect")
    return member


def amalgam_handler(ctx: Any) -> tuple[type, dict[str, Any]]:
    """The ``_OPTIMIZER_HANDLERS["amalgam"]`` entry: ``OptimizerContext -> (AmalgamOptimizer, kwargs)``."""
    from amalgam_plugin.optim import AmalgamOptimizer
    from amalgam_plugin.students.sources import DEFAULT_STUDENT

    options = parse_options(ctx.optim_args, AmalgamOptimizer, extra=INTEGRATION_OPTIONS)
    if "lr" in options:
        raise ValueError("optim_args cannot set 'lr' for optim='amalgam'; use lr_multiplier=... instead")
    multiplier = options.pop("lr_multiplier", 1.0)
    fallback = options.pop("fallback", None)
    student, lr = framework_student("transformers Trainer", options.pop("student", DEFAULT_STUDENT),
                                    options.pop("revision", None), ctx.args.learning_rate, multiplier)
    kwargs: dict[str, Any] = {**options, "student": student, "lr": lr}
    if fallback is not None:
        if ctx.model is None:
            raise ValueError("optim_args fallback=... needs the Trainer's model")
        kwargs["params"] = fallback_param_groups(ctx.model, fallback, ctx.args.weight_decay)
    return AmalgamOptimizer, kwargs


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The parameters the Trainer applies weight decay to (``Trainer.get_decay_parameter_names``)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # does not use self in 5.x


def fallback_param_groups(model: nn.Module, spec: str, weight_decay: float) -> list[dict[str, Any]]:
    """The Trainer's decay / no-decay groups, each split into a student part and a ``use_fallback`` part."""
    chosen = select_fallback(model, spec)
    decay = decay_parameter_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name in decay, name in chosen), []).append(param)
    logger.info("fallback=%r: %d parameter tensors run AdamW", spec, sum(len(v) for (_, f), v in groups.items() if f))
    return [
        {
            "params": params,
            "weight_decay": weight_decay if has_decay else 0.0,
            **({"use_fallback": True} if fb else {}),
        }
        for (has_decay, fb), params in sorted(groups.items())
    ]


def register() -> None:
    """Make ``optim="amalgam"`` a valid Trainer optimizer; idempotent.

    Raises:
        UnsupportedLibraryError: the installed transformers lacks the internals this relies on.
    """
    names, handlers = _internals()
    member = _add_enum_member(names)
    if handlers.get(member) is not amalgam_handler:
        handlers[member] = amalgam_handler
        logger.debug("registered optim=%r with transformers %s", OPTIM_NAME, transformers.__version__)


register()

__all__ = ["OPTIM_NAME", "amalgam_handler", "check_internals", "fallback_param_groups", "register"]
