"""The held-out suite (docs/heldout.md): real models no student is meta-trained on, scored against tuned AdamW."""

from .runner import DEFAULT_LRS, run_suite
from .task import HeldoutTask, TaskData, task_from_module
from .tasks import HELDOUT_TASKS

__all__ = ["DEFAULT_LRS", "HELDOUT_TASKS", "HeldoutTask", "TaskData", "run_suite", "task_from_module"]
