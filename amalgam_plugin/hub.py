"""Hub format, model cards and name resolution for students.

**Folder format** (the Hugging Face Hub layout, also used for bundled students):

* ``config.json``: ``asdict(student.config)`` with ``student_type`` (a key of the student registry
  ``amalgam_plugin.students.STUDENTS``) and ``format_version`` (an integer, at most :data:`FORMAT_VERSION` to be
  loadable);
* ``model.safetensors``: the weights, keyed like ``student.state_dict()`` (safetensors only; pickle files such
  as ``pytorch_model.bin`` are refused, never loaded);
* ``README.md``: the model card (YAML metadata + sections, see :func:`render_card`);
* ``heldout_loss.png``: held-out loss against steps, when an evaluation was given.

**Name resolution** (:func:`load_student`), first match wins:

1. an existing local folder (a path; a path-like string that does not exist is an error, never a Hub id);
2. a bundled student: a folder name under ``hub_models/`` (package ``amalgam_plugin.hub_models``, installed
   with the package, works offline); :func:`list_bundled` lists them;
3. a Hub repo id ``owner/name``: downloaded with ``huggingface_hub.snapshot_download`` (``revision=`` pins a
   branch, tag or commit; cached in ``cache_dir`` or the default Hub cache; ``HF_HUB_OFFLINE=1`` or
   ``local_files_only=True`` read the cache only).

The loaded module is frozen (``requires_grad=False``), in eval mode, loaded with ``strict=True`` after
explicit key and shape checks, and remembers where it came from (:func:`student_identity`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import write_atomically
from .students import STUDENTS
from .students.base import FORMAT_VERSION, PAPER_URL

logger = logging.getLogger(__name__)

DEFAULT_STUDENT = "paper-choice-large"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "heldout_loss.png"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.pkl", "pytorch_model.pt")
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, "*.png"]
MAX_CONFIG_BYTES = 1024**2
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names; weights of any other dtype are refused
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IDENTITY_ATTR = "_amalgam_identity"

PAPER_CITATION = """@inproceedings{huang2022optimizer,
  title     = {Optimizer Amalgamation},
  author    = {Huang, Tianshu and Chen, Tianlong and Liu, Sijia and Chang, Shiyu and Amini, Lisa
               and Wang, Zhangyang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2022},
  url       = {https://arxiv.org/abs/2203.06474}
}"""
BASE_TAGS = [
    "amalgam-plugin",
    "optimizer",
    "learned-optimizer",
    "optimizer-amalgamation",
    "pytorch",
    "arxiv:2203.06474",
]


# --- bundled students ---------------------------------------------------------------------------------------


def bundled_root() -> Path:
    """The folder of the bundled students (package ``amalgam_plugin.hub_models``; in a source checkout that is
    not installed, the checkout's ``hub_models/``)."""
    try:
        return Path(str(importlib.resources.files("amalgam_plugin.hub_models")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "hub_models"


def _bundled_names() -> list[str]:
    root = bundled_root()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_NAME).is_file())


def list_bundled() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every bundled student; the description is the config's
    ``provenance["description"]``."""
    out = []
    for name in _bundled_names():
        try:
            config = json.loads((bundled_root() / name / CONFIG_NAME).read_text())
            provenance = config.get("provenance") or {}
            description = provenance.get("description") or f"{config.get('student_type', '?')} student"
        except (OSError, ValueError) as err:
            description = f"(unreadable config.json: {err})"
        out.append((name, " ".join(str(description).split())))
    return out


# --- resolution and loading ---------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or os.sep in text.replace("/", "")
        or text.count("/") > 1
        or (os.altsep is not None and os.altsep in text)
    )


def _package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("amalgam-plugin")
    except Exception:  # noqa: BLE001 (not installed as a distribution)
        return None


def resolve(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The folder holding a student and where it came from (``{"source", "name", "revision"}``), in the order
    of the module docstring: local folder, bundled name, Hub repo id."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, {"source": "local", "name": str(path.resolve()), "revision": revision}
    if path.exists():
        raise ValueError(
            f"{text!r} is a file, not a student folder (expected a folder with {CONFIG_NAME} "
            f"and {WEIGHTS_NAME})"
        )
    bundled = _bundled_names()
    if text in bundled:
        return bundled_root() / text, {"source": "bundled", "name": text, "revision": _package_version()}
    if (isinstance(name_or_path, os.PathLike) or _looks_like_path(text) or not _REPO_ID.match(text)
            or ".." in text.split("/")):
        raise FileNotFoundError(
            f"no student folder {text!r}, and it is neither a bundled student "
            f"({', '.join(bundled) or 'none'}) "
            "nor a Hub repo id of the form owner/name"
        )
    return _download(text, revision, cache_dir, local_files_only)


def _download(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool | None
) -> tuple[Path, dict[str, Any]]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r} is no local folder or bundled student, and Hub repo {repo_id!r}" + (
        f" at revision {revision!r}" if revision else ""
    )
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            library_name="amalgam-plugin",
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{where} is not in the local Hub cache ({cache_dir or 'default cache'}) and cannot be "
            "downloaded "
            f"(offline, or the network failed): {err}"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{where}: no such revision: {err}") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{where}: no such repository (or no access): {err}") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from err
    folder = Path(folder)
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, {"source": "hub", "name": repo_id, "revision": commit}


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a student folder, validated (student type known, format version supported)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        extra = f" (it holds {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise FileNotFoundError(f"student folder {str(folder)!r} has no {CONFIG_NAME}{extra}")
    size = config_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{str(config_path)!r} is {size:,} bytes; a student config is at most {MAX_CONFIG_BYTES:,}")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_path)!r} must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(
            f"{str(config_path)!r} has no integer format_version (got {version!r}); "
            "it is not an amalgam-plugin student config"
        )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(config_path)!r} has format_version {version}, newer than this amalgam-plugin supports "
            f"({FORMAT_VERSION}); upgrade amalgam-plugin"
        )
    student_type = config.get("student_type")
    if not isinstance(student_type, str) or student_type not in STUDENTS:
        raise ValueError(
            f"{str(config_path)!r}: unknown student_type {student_type!r}; valid student types: {STUDENTS.valid()}"
        )
    return config


def _build(config: dict[str, Any], where: str) -> nn.Module:
    entry = STUDENTS[config["student_type"]]
    cls, config_cls = entry.module, entry.config
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        logger.warning("%s: ignoring unknown config keys %s", where, ", ".join(unknown))
    try:
        return cls(config_cls(**{k: v for k, v in config.items() if k in known}))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid {config['student_type']} config: {err}") from err


def _check_header(weights: Path, expected: Mapping[str, torch.Tensor], student_type: str) -> None:
    """Names, dtypes and shapes from the safetensors header, checked before any tensor data is read."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{str(weights)!r} does not match a {student_type} student with this config: "
            f"missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}"
        )
    dtypes = [f"{k}: {dtype}" for k, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES]
    if dtypes:
        raise ValueError(f"{str(weights)!r}: weights must be floating point; got " + ", ".join(dtypes))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {shape}" for k, (_, shape) in header.items()
              if shape != tuple(expected[k].shape)]
    if shapes:
        raise ValueError(f"{str(weights)!r}: shape mismatch with the config in {CONFIG_NAME}: " + "; ".join(shapes))


def _check_links(folder: Path) -> None:
    """A student's files may be links within its folder or, in a Hub cache snapshot (``.../snapshots/REV``),
    into the repository's blobs; a link anywhere else is refused (it could read any file of the machine)."""
    roots = [folder.resolve()] + ([folder.parent.parent.resolve()] if folder.parent.name == "snapshots" else [])
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        target = (folder / name).resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise ValueError(f"{str(folder / name)!r} links outside the student folder (to {str(target)!r}); refused")


def load_folder(folder: str | os.PathLike) -> nn.Module:
    """Build and load the student in ``folder`` (safetensors only, strict keys and shapes), frozen."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no student folder {str(folder)!r}")
    _check_links(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
        if pickles:
            raise ValueError(
                f"student folder {str(folder)!r} holds only pickle weights ({', '.join(pickles)}) and no "
                f"{WEIGHTS_NAME}: pickle is never loaded (it can run arbitrary code); convert the weights to "
                "safetensors"
            )
        raise FileNotFoundError(f"student folder {str(folder)!r} has no {WEIGHTS_NAME}")
    config = read_config(folder)
    student = _build(config, str(folder))
    _check_header(weights, student.state_dict(), config["student_type"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{str(weights)!r} is not a readable safetensors file (corrupt or truncated?): {err}"
        ) from err
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{str(weights)!r}: non-finite values in {', '.join(bad)}")
    student.load_state_dict(tensors, strict=True)
    return student.eval().requires_grad_(False)


def load_student(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> nn.Module:
    """A frozen student (eval mode) from a local folder, a bundled name or a Hub repo id (see the module
    docstring for the order). ``revision`` pins a Hub branch, tag or commit; ``cache_dir`` and
    ``local_files_only`` go to huggingface_hub (``None``: its defaults, which honour ``HF_HUB_OFFLINE``)."""
    folder, origin = resolve(name_or_path, revision, cache_dir, local_files_only)
    student = load_folder(folder)
    setattr(student, _IDENTITY_ATTR, {**origin, "folder": str(folder)})
    logger.info(
        "loaded %s student %r (%s, revision %s)",
        student.config.student_type,
        origin["name"],
        origin["source"],
        origin["revision"],
    )
    return student


def content_hash(student: nn.Module) -> str:
    """sha256 of the student's config (canonical JSON, without ``provenance``, which records where a student
    came from, not how it behaves) and weights (name, dtype, shape, bytes, sorted by name)."""
    digest = hashlib.sha256()
    config = {k: v for k, v in _config_dict(student).items() if k != "provenance"}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(student.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def student_identity(student: nn.Module) -> dict[str, Any]:
    """``{"name", "revision", "source", "sha256"}``: where the student was loaded from (``None`` for a module
    built in code) and the content hash of its config and weights, which identifies it in any case."""
    origin = getattr(student, _IDENTITY_ATTR, None) or {}
    return {
        "name": origin.get("name"),
        "revision": origin.get("revision"),
        "source": origin.get("source", "module"),
        "sha256": content_hash(student),
    }


# --- saving and model cards ---------------------------------------------------------------------------------


def _config_dict(student: nn.Module) -> dict[str, Any]:
    config = getattr(student, "config", None)
    if config is None:
        raise ValueError(f"{type(student).__name__} has no .config: not an amalgam-plugin student")
    data = asdict(config)
    data["student_type"] = getattr(student, "student_type", data.get("student_type"))
    data["format_version"] = FORMAT_VERSION
    return data


CARD_KEYS = {
    "title": "heading of the card (default: the student type)",
    "description": "one paragraph: what this student is",
    "pool": "the teacher pool: a preset name, or a list of teacher specs (strings or dicts)",
    "mechanism": "amalgamation mechanism: mean, minmax or choice (or a sentence)",
    "problem": "the training (meta-training) problem",
    "data_split": "which data the student saw and which it never saw",
    "recipe": "the meta-training recipe (text, or a dict of settings shown as a list)",
    "perturbation": "the perturbation of the student's weights during meta-training (dict or text)",
    "seeds": "the seeds used (meta-training and evaluation)",
    "command": "the command that reproduces this folder",
    "intended_use": "intended use (default text provided)",
    "limitations": "limits (default text provided)",
    "evaluation_notes": "how the evaluation was run, e.g. reduced protocol, how baselines were chosen",
    "notes": "anything else (provenance, selection, caveats)",
    "license_notice": "a license notice to carry (e.g. the MIT notice of the original weights)",
    "citation": "BibTeX (default: the paper)",
    "tags": "extra Hub tags (list of strings)",
}

DEFAULT_INTENDED_USE = (
    "A learned, coordinate-wise optimizer for PyTorch: `AmalgamOptimizer(model.parameters(), student=...)` "
    "in an ordinary training loop, in place of Adam or SGD. Best suited to small and medium networks and "
    "tasks close to its training problem (image classifiers of MNIST scale)."
)
DEFAULT_LIMITATIONS = (
    "Learned optimizers generalise imperfectly: far from the training problem (other architectures, much "
    "longer runs, very different loss scales) the student may be slower than a tuned Adam or diverge. Its "
    "update per coordinate is bounded (RNNProp: at most 0.1 per step before `lr`), so `lr` rescales it. "
    "The student keeps per-parameter state (RNNProp: 82 floats per parameter, far more than Adam's 2; the lean "
    "student: 4)."
)


def _md_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "\n".join(f"- `{k}`: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if isinstance(v, Mapping):
                v = ", ".join(f"{k}={x}" for k, x in v.items())
            items.append(f"- {v}")
        return "\n".join(items)
    return str(value)


def _front_matter(tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="amalgam-plugin", license="mit", tags=tags)
    return f"---\n{data.to_yaml()}\n---\n"


def render_card(
    config: Mapping[str, Any],
    card: Mapping[str, Any] | None = None,
    evaluation: Any = None,
    plot_name: str | None = None,
    reference: str | None = None,
) -> str:
    """The README.md model card: YAML metadata (library_name, license, tags incl. ``arxiv:2203.06474``)
    and the sections Intended use, Limits, How to use, Training (teacher pool, mechanism, problem, data split,
    recipe, seeds), Reproduce, Evaluation (table + plot), Notes, License, Citation. ``card`` keys:
    :data:`CARD_KEYS`."""
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ValueError(f"unknown model-card keys {', '.join(unknown)}; valid keys: {', '.join(CARD_KEYS)}")
    student_type = config.get("student_type", "?")
    tags = list(dict.fromkeys(BASE_TAGS + [f"student-{student_type}"] + list(card.get("tags", []))))
    title = card.get("title") or f"amalgam-plugin {student_type} student"
    out = [_front_matter(tags), f"# {title}\n"]
    if card.get("description"):
        out.append(f"{card['description']}\n")
    out.append(
        f"A learned optimizer trained by [Optimizer Amalgamation]({PAPER_URL}) (Huang et al., ICLR 2022): a "
        "student optimizer distilled from a pool of analytical teacher optimizers. Saved by amalgam-plugin "
        "in the Hub format "
        f"(`{CONFIG_NAME}` with `student_type` and `format_version`, `{WEIGHTS_NAME}`). References of the form "
        "`docs/method.md#section` point to the method document of the amalgam-plugin repository, which states "
        "every formula, value and deviation from the paper.\n"
    )
    out.append(f"## Intended use\n\n{card.get('intended_use') or DEFAULT_INTENDED_USE}\n")
    out.append(f"## Limits\n\n{card.get('limitations') or DEFAULT_LIMITATIONS}\n")
    out.append(
        "## How to use\n\n```python\nfrom amalgam_plugin.optim import AmalgamOptimizer\n\n"
        'optimizer = AmalgamOptimizer(model.parameters(), student="<this folder, bundled name or repo id>")\n'
        "# lr multiplies the student's update (1.0 = as trained); weight_decay is in AdamW units\n```\n\n"
        f"Warm-up: the first {config.get('warmup_steps', 0)} steps are plain SGD at lr "
        f"{config.get('warmup_lr', 0)} with the student's recurrent state frozen (as the student was "
        "evaluated); override with `warmup_steps=`.\n"
    )
    training = []
    for key, label in [
        ("pool", "Teacher pool"),
        ("mechanism", "Mechanism"),
        ("problem", "Training problem"),
        ("data_split", "Data split"),
        ("recipe", "Recipe"),
        ("perturbation", "Perturbation (docs/method.md#perturbations)"),
        ("seeds", "Seeds"),
    ]:
        if card.get(key) is not None:
            value = _md_value(card[key])
            training.append(f"**{label}**:" + ("\n\n" + value if "\n" in value else f" {value}"))
    arch = {
        k: config[k] for k in ("hidden_sizes", "output_scale", "beta1", "beta2", "epsilon") if k in config
    }
    training.append(f"**Architecture**: `{student_type}` " + ", ".join(f"{k}={v}" for k, v in arch.items()))
    out.append("## Training\n\n" + "\n\n".join(training) + "\n")
    if card.get("command"):
        out.append(f"## Reproduce\n\n```bash\n{card['command']}\n```\n")
    if evaluation is not None:
        section = [
            "## Evaluation\n",
            evaluation.protocol() + "\n",
            evaluation.table("markdown", reference) + "\n",
        ]
        if evaluation.notes:
            section.append("How the baselines were chosen:\n\n" + evaluation.notes_text() + "\n")
        if card.get("evaluation_notes"):
            section.append(f"{card['evaluation_notes']}\n")
        if plot_name:
            section.append(f"![held-out loss against steps]({plot_name})\n")
        out.append("\n".join(section))
    elif card.get("evaluation_notes"):
        out.append(f"## Evaluation\n\n{card['evaluation_notes']}\n")
    if card.get("notes"):
        out.append(f"## Notes\n\n{_md_value(card['notes'])}\n")
    license_text = "MIT."
    if card.get("license_notice"):
        license_text += f"\n\n```\n{card['license_notice'].strip()}\n```"
    out.append(f"## License\n\n{license_text}\n")
    out.append(f"## Citation\n\n```bibtex\n{card.get('citation') or PAPER_CITATION}\n```\n")
    return "\n".join(out)


def save_student(
    student: nn.Module,
    folder: str | os.PathLike,
    card: Mapping[str, Any] | None = None,
    evaluation: Any = None,
    reference: str | None = None,
) -> Path:
    """Write ``student`` to ``folder`` in the Hub format: ``config.json``, ``model.safetensors``, the
    README.md model card (``card``: keys of :data:`CARD_KEYS`) and, when ``evaluation`` (an
    ``amalgam_plugin.evaluate.Evaluation``) is given, its table in the card and ``heldout_loss.png``.
    ``reference``: the optimizer the card's paired differences are taken against (default: the evaluation's).
    Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _config_dict(student)
    STUDENTS.lookup(config["student_type"])
    if card is not None:
        render_card(config, card)  # validate the keys before writing anything
    # Interrupted at any point, the folder holds no student that loads: config.json goes first and comes back
    # last, and every file is written beside and renamed into place.
    (folder / CONFIG_NAME).unlink(missing_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in student.state_dict().items()}
    # one metadata key only: safetensors writes its metadata map in no fixed order, and a bundled file
    # should be byte-identical when rebuilt
    write_atomically(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    plot_name = None
    if evaluation is not None and evaluation.runs:
        title = f"{folder.name}: held-out loss on {evaluation.problem}"
        write_atomically(folder / PLOT_NAME, lambda tmp: evaluation.plot(tmp, title, reference or evaluation.reference))
        plot_name = PLOT_NAME
    card_text = render_card(config, card, evaluation, plot_name, reference)
    write_atomically(folder / CARD_NAME, lambda tmp: tmp.write_text(card_text))
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_atomically(folder / CONFIG_NAME, lambda tmp: tmp.write_text(config_text))
    logger.info("saved %s student to %s", config["student_type"], folder)
    return folder


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved student folder to the Hub repo ``repo_id`` (created if needed) and return the repo URL.
    The folder is loaded first (a broken folder is never pushed); only the Hub-format files go up
    (config.json, model.safetensors, README.md, PNG plots). ``revision``: a branch to push to (created if
    missing)."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    load_folder(folder)
    if not (folder / CARD_NAME).is_file():
        raise FileNotFoundError(
            f"student folder {str(folder)!r} has no {CARD_NAME} model card; save it with save_student first"
        )
    api = HfApi(token=token)
    url = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        token=token,
        revision=revision,
        commit_message=commit_message or f"Upload amalgam-plugin student from {folder.name}",
        allow_patterns=HUB_FILES,
    )
    logger.info("pushed %s to %s", folder, url)
    return str(url)


def student_from_npz(path: str | os.PathLike, config: Any = None) -> nn.Module:
    """An RNNProp from one of the paper's ``.npz`` files (Keras-layout keys equal to the state_dict names)."""
    import numpy as np

    from .students import RNNProp, RNNPropConfig

    arrays = np.load(path, allow_pickle=False)
    student = RNNProp(config or RNNPropConfig())
    try:
        student.load_state_dict(
            {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in arrays.files}, strict=True
        )
    except RuntimeError as err:
        raise ValueError(f"{os.fspath(path)!r} does not hold RNNProp weights: {err}") from err
    return student.eval().requires_grad_(False)
