"""Shared by the integrations: the framework learning-rate rule, option parsing, fallback selection."""

from __future__ import annotations

import fnmatch
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from amalgam_plugin.teachers import parse_value

logger = logging.getLogger("amalgam_plugin.integrations")

#: Named parameter categories accepted by ``fallback=`` (joined with ``+``), besides glob patterns on names.
FALLBACK_CATEGORIES: dict[str, str] = {
    "embeddings": "parameters of nn.Embedding modules (and modules whose class name contains 'Embedding')",
    "norms": "parameters of normalisation layers (class name contains 'Norm')",
    "biases": "parameters whose name ends with 'bias'",
    "1d": "parameters with at most one dimension",
    "all": "every parameter (the whole model runs the fallback AdamW)",
}

#: Options whose values stay strings (a revision such as "1234" must not become an int).
STRING_OPTIONS = ("student", "fallback", "revision")


def framework_student(
    framework: str, student: Any, revision: str | None, framework_lr: float | None, lr_multiplier: float = 1.0
) -> tuple[nn.Module, float]:
    """The student an integration runs (loaded once, here) and the group ``lr`` it starts at.

    A student whose config has an ``lr`` (normalized: its update has RMS 1 per tensor) takes AdamW's learning
    rate, so the framework's value is used as is (the student's own default when the framework gives none),
    times ``lr_multiplier``. Any other student's ``lr`` multiplies its update as trained: the group starts at
    ``1.0 * lr_multiplier`` whatever the framework says, since a value tuned for AdamW means nothing to it (one
    log line says so; docs/method.md#runtime, "Through an ecosystem"). The framework's schedule scales the group
    ``lr`` either way.
    """
    from amalgam_plugin.optim import adamw_lr_default, resolve_student

    module = resolve_student(student, revision)
    own_lr = adamw_lr_default(module)
    if own_lr is not None:
        return module, float(own_lr if framework_lr is None else framework_lr) * float(lr_multiplier)
    lr = 1.0 * float(lr_multiplier)
    if framework_lr is not None:
        logger.warning(
            "%s learning rate %g is ignored by AmalgamOptimizer: groups start at lr=%g "
            "(1.0 x lr_multiplier=%g, the student's update as trained); "
            "the learning-rate schedule shape still applies.",
            framework,
            framework_lr,
            lr,
            lr_multiplier,
        )
    return module, lr


def constructor_options(optimizer_cls: type) -> list[str]:
    """Keyword arguments of ``optimizer_cls.__init__`` other than ``params`` (what options may set)."""
    signature = inspect.signature(optimizer_cls.__init__)
    return [
        name
        for name, p in signature.parameters.items()
        if name not in ("self", "params") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def parse_options(options: Mapping[str, str], optimizer_cls: type, extra: Iterable[str] = ()) -> dict[str, Any]:
    """Convert ``key=value`` strings for ``optimizer_cls`` (plus ``extra`` integration keys); check keys.

    The keys of :data:`STRING_OPTIONS` stay strings; other values go through :func:`parse_value`.

    Raises:
        ValueError: an unknown key, naming the valid ones.
    """
    valid = sorted({*constructor_options(optimizer_cls), *extra})
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        if key not in valid:
            raise ValueError(f"unknown AmalgamOptimizer option {key!r}={value!r}; valid options: {valid}")
        parsed[key] = value if key in STRING_OPTIONS else parse_value(value)
    return parsed


def _is_pattern(token: str) -> bool:
    return any(ch in token for ch in "*?[")


def fallback_predicate(spec: str) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    """Turn ``"embeddings+norms"`` (categories of :data:`FALLBACK_CATEGORIES` or glob patterns on parameter
    names, joined with ``+``) into ``predicate(name, param, owning_module) -> bool``.

    Raises:
        ValueError: an empty spec or a token that is neither a category nor a glob pattern.
    """
    tokens = [t for t in spec.replace(" ", "").split("+") if t]
    bad = [t for t in tokens if t.lower() not in FALLBACK_CATEGORIES and not _is_pattern(t)]
    if not tokens or bad:
        raise ValueError(
            f"invalid fallback={spec!r} (bad: {bad or 'empty'}); "
            f"use categories {sorted(FALLBACK_CATEGORIES)} "
            "or glob patterns on parameter names (e.g. '*.embed*'), joined with '+'"
        )

    def matches(token: str, name: str, param: nn.Parameter, module: nn.Module) -> bool:
        kind = type(module).__name__
        category = token.lower()
        if category == "all":
            return True
        if category == "embeddings":
            return isinstance(module, nn.Embedding) or "Embedding" in kind
        if category == "norms":
            return "Norm" in kind
        if category == "biases":
            return name.endswith("bias")
        if category == "1d":
            return param.ndim <= 1
        return fnmatch.fnmatchcase(name, token)

    def predicate(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return any(matches(token, name, param, module) for token in tokens)

    return predicate


def select_fallback(model: nn.Module, spec: str) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the parameters ``spec`` picks for the fallback AdamW.

    Raises:
        ValueError: a bad spec (see :func:`fallback_predicate`), or one that picks no parameter.
    """
    predicate = fallback_predicate(spec)
    chosen: set[str] = set()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if id(param) in seen:  # tied weights: named_parameters() reports the first owner only
                continue
            seen.add(id(param))
            if predicate(name, param, module):
                chosen.add(name)
    if not chosen:
        raise ValueError(f"fallback={spec!r} selects no parameter of {type(model).__name__}")
    return chosen
