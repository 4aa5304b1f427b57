"""Learned optimizers applied coordinate-wise: ``init_state(n, like)``, ``update_moments(grad, state)`` (the
warm-up step, LSTM frozen) and ``forward(grad, state, rank) -> (delta, new_state)`` on flat ``[n]`` tensors."""

from .choice import ChoiceConfig, ChoiceNet
from .rnnprop import RNNProp, RNNPropConfig

STUDENT_TYPES = {"rnnprop": (RNNProp, RNNPropConfig), "choice": (ChoiceNet, ChoiceConfig)}

__all__ = ["STUDENT_TYPES", "ChoiceConfig", "ChoiceNet", "RNNProp", "RNNPropConfig"]
