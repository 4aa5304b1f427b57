"""Students on the Hugging Face Hub and on disk: the public face of

* ``students/format.py``: the folder format (config.json with ``student_type`` and ``format_version``,
  model.safetensors, the README.md model card), read with strict checks and written crash-safely;
* ``students/sources.py``: name resolution (a local folder, a bundled student, a Hub repo id) and the bundled
  students;
* :mod:`.folders`: loading and saving a student of any registered type (``load_student``, ``save_student``);
* :mod:`.identity`: the content hash and origin of a student;
* :mod:`.push`: uploading a folder to the Hub;
* ``amalgam_plugin.cards``: the model card.

The loaded module is frozen (``requires_grad=False``), in eval mode, loaded with ``strict=True`` after
explicit key and shape checks, and remembers where it came from (:func:`student_identity`).
"""

from ..cards import CARD_KEYS, Card, render_card
from ..students.format import (
    CARD_NAME,
    CONFIG_NAME,
    FORMAT_VERSION,
    MAX_CONFIG_BYTES,
    PICKLE_NAMES,
    PLOT_NAME,
    WEIGHTS_NAME,
    read_config,
)
from ..students.sources import DEFAULT_STUDENT, bundled_root, list_bundled, resolve
from .folders import load_folder, load_student, save_student, student_from_npz
from .identity import content_hash, student_identity
from .push import hub_files, push_folder

__all__ = ["CARD_KEYS", "CARD_NAME", "CONFIG_NAME", "DEFAULT_STUDENT", "FORMAT_VERSION", "MAX_CONFIG_BYTES",
           "PICKLE_NAMES", "PLOT_NAME", "WEIGHTS_NAME", "Card", "bundled_root", "content_hash", "hub_files",
           "list_bundled", "load_folder", "load_student", "push_folder", "read_config", "render_card", "resolve",
           "save_student", "student_from_npz", "student_identity"]
