"""Meta-training killed with SIGKILL at five points of a run (inside a meta-step, between periods, while a
checkpoint is being written, during the final save, during the card's evaluation): each time ``--resume``
finishes with a student bit-identical to an uninterrupted run's, and in between the output folder never holds a
student that loads but differs from it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from amalgam_plugin import hub

RUN = """
import os, signal, sys
from pathlib import Path
point, out = sys.argv[1], Path(sys.argv[2])
resume = point == "resume"

def dies_on_call(module, name, nth, after=True, before_death=None):
    real, calls = getattr(module, name), {"n": 0}
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args, **kwargs)
        if calls["n"] == nth:
            if before_death:
                before_death(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(module, name, wrapper)

import amalgam_plugin.engine.curriculum as curriculum, amalgam_plugin.engine.estimator as estimator
import amalgam_plugin.engine.learner as learner, amalgam_plugin.evaluate.runs as runs
import amalgam_plugin.students.format as student_format
if point == "meta_step":
    dies_on_call(estimator, "unroll", 3)  # after the unroll, before its backward and the meta-update
elif point == "between_periods":
    dies_on_call(curriculum.Curriculum, "_checkpoint", 2)
elif point == "checkpoint_write":  # the new checkpoint is half written when the process dies
    dies_on_call(learner, "save_file", 2,
                 before_death=lambda tensors, path, **kw: os.truncate(path, os.path.getsize(path) // 2))
elif point == "final_save":
    dies_on_call(student_format, "write_text_atomically", 1, after=False)  # the weights are written, not the card
elif point == "evaluation":
    dies_on_call(runs, "run", 3, after=False)
from amalgam_plugin.engine import amalgamate
amalgamate(pool="small", mechanism="mean", preset="smoke", problem="mlp", out=out, resume=resume, workers=1)
"""


def amalgamate_in_a_process(point: str, out: Path) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", RUN, point, str(out)], capture_output=True, timeout=300,
                          env=env).returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "s"
    assert amalgamate_in_a_process("none", out) == 0
    return out


# three of the five kill points run only with -m slow, to keep the default run within 10 minutes on 2 cores
@pytest.mark.parametrize("point", ["meta_step", "checkpoint_write", *(
    pytest.param(point, marks=pytest.mark.slow) for point in ("between_periods", "final_save", "evaluation"))])
def test_killed_anywhere_resume_gives_the_same_student(uninterrupted, tmp_path, point):
    out = tmp_path / "s"
    assert amalgamate_in_a_process(point, out) == -signal.SIGKILL
    try:
        partial = hub.load_folder(out)
    except (ValueError, FileNotFoundError):
        partial = None  # nothing that loads: as it should be mid-run
    if partial is not None:
        assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    assert amalgamate_in_a_process("resume", out) == 0
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
