from pathlib import Path

import numpy as np
import pytest
import torch

from amalgam_plugin import hub
from amalgam_plugin.students import RNNProp

ROOT = Path(__file__).resolve().parents[1]
PAPER_STUDENTS = ROOT.parent / "shared" / "reference" / "paper_students"
"""The paper's pre-trained students as ``.npz`` files (the repository's sibling ``shared`` folder)."""


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the tests' tensors are small, and with two threads on a busy 2-core machine torch's
    thread pool spends far more time waiting than computing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def paper_student_name() -> str:
    """The bundled student with the paper's choice-large weights, by name."""
    name = "paper-choice-large"
    assert name in dict(hub.list_bundled()), f"hub_models/{name} is missing"
    return name


@pytest.fixture(scope="module")
def paper_student() -> RNNProp:
    """The paper's trained choice-large student as a module, so the learned branch is a real optimizer."""
    arrays = np.load(PAPER_STUDENTS / "choice-large-1.npz")
    student = RNNProp()
    student.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files})
    return student
