"""Evaluation of optimizers on a problem (docs/method.md#evaluation), one concept per module:

- :mod:`.runs`: one run (:func:`run`, :class:`RunResult`, paired seeds by :func:`seed_generators`);
- :mod:`.metrics`: the metrics of a run, in one table (:data:`METRICS`);
- :mod:`.statistics`: t quantiles, paired differences with t-intervals, replicate variance components;
- :mod:`.report`: :class:`Evaluation`, the runs of several optimizers on the same seeds, its tables and plot;
- :mod:`.cache`: the cache of finished runs, keyed by each run's full specification (:class:`Specified`);
- :mod:`.executor`: runs in forked worker processes of one thread, which die with their parent;
- :mod:`.runner`: :func:`evaluate`, every optimizer on every seed, from the cache or run;
- :mod:`.baselines`: the pool's teachers in both forms, tuned torch Adam, students, and the protocol in one call
  (:func:`evaluate_with_baselines`).

Independent runs can execute in worker processes (``workers=`` of :func:`evaluate`, :func:`tune_adam` and
:func:`evaluate_with_baselines`): each worker is a ``fork`` of the caller running one thread, and a run's
numbers in a worker equal the in-process ones when the caller also runs one thread.

Library code here never changes the calling process's torch thread count; scripts decide that.
"""

from .baselines import (
    ADAM_TUNING_LRS,
    TunedChoice,
    evaluate_with_baselines,
    pool_baselines,
    student_factory,
    teacher_factory,
    textbook_factory,
    torch_adam,
    torch_factory,
    tune_adam,
)
from .cache import Specified, load_runs, run_key, runs_on, specification
from .metrics import METRICS, Metric
from .report import Evaluation, markdown_cell
from .runner import evaluate
from .runs import OptimizerFactory, RunResult, run, seed_generators
from .statistics import PairedDifference, VarianceComponents, paired_difference, t_quantile, variance_components

__all__ = [
    "ADAM_TUNING_LRS", "METRICS", "Evaluation", "Metric", "OptimizerFactory", "PairedDifference", "RunResult",
    "Specified", "TunedChoice", "VarianceComponents", "evaluate", "evaluate_with_baselines", "load_runs",
    "markdown_cell", "paired_difference", "pool_baselines", "run", "run_key", "runs_on", "seed_generators",
    "specification", "student_factory", "t_quantile", "teacher_factory", "textbook_factory", "torch_adam",
    "torch_factory", "tune_adam", "variance_components",
]
