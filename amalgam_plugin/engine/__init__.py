"""Meta-training: ``amalgamate(...)`` runs what ``amalgam amalgamate`` runs.

The modules, one concept each:

* ``run.py``: one run, from its request to the student in Hub layout (``amalgamate``)
* ``request.py``: the request (``AmalgamateRequest``) and every check of it, before any work
* ``outdir.py``: the output folder: never a user's files unasked, one run at a time (a lock)
* ``presets.py``: the recipes; a phase's recipe is a ``PhaseConfig`` of three configs:
* ``curriculum.py``: the schedule (``ScheduleConfig``) over stages and periods, validation, checkpoints
* ``estimator.py``: the meta-gradient of a truncated unroll (``EstimatorConfig``; ``unroll.py``, ``perturbations.py``)
* ``learner.py``: averaging and applying meta-gradients, across processes too (``LearnerConfig``)
* ``selection.py``: the choice of the final checkpoint (horizon selection)
* ``distributed.py``: the processes of a launcher (torchrun, accelerate launch)
* ``card_evaluation.py`` and ``provenance.py``: the model card's evaluation, its fields and the rebuilt command
"""

from __future__ import annotations

from .card_evaluation import KNOWN_RUNS
from .curriculum import Curriculum, PhaseConfig, ScheduleConfig
from .estimator import EstimatorConfig
from .learner import LearnerConfig
from .perturbations import PERTURBATIONS, Perturbation
from .presets import PRESETS, Preset
from .provenance import model_card
from .request import DEFAULT_THREADS, AmalgamateRequest, check_request
from .run import amalgamate
from .selection import SELECT_FLAGS, SELECTIONS

__all__ = ["DEFAULT_THREADS", "KNOWN_RUNS", "PERTURBATIONS", "PRESETS", "SELECT_FLAGS", "SELECTIONS",
           "AmalgamateRequest", "Curriculum", "EstimatorConfig", "LearnerConfig", "Perturbation", "PhaseConfig",
           "Preset", "ScheduleConfig", "amalgamate", "check_request", "model_card"]
