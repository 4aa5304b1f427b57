"""Uploading a saved student folder to the Hugging Face Hub: the Hub files only, never links, never anything else
the folder holds (``training/``, notes, checkpoints)."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HTTPError

from ..students.format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from .folders import load_folder

logger = logging.getLogger(__name__)

REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


def hub_files(folder: Path) -> list[str]:
    """The names ``push_folder`` uploads: config.json, model.safetensors, README.md and the PNG plots beside them,
    all regular files of the folder itself. A required file that is a link is refused; a linked plot is left out."""
    for name in REQUIRED_FILES:
        if (folder / name).is_symlink():
            raise ValueError(f"{str(folder / name)!r} is a symbolic link; push uploads regular files only")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"student folder {str(folder)!r} has no {name}"
                                    + ("; save it with save_student first" if name == CARD_NAME else ""))
    plots = []
    for path in sorted(folder.glob("*.png")):
        if path.is_symlink() or not path.is_file():
            logger.warning("not uploading %s: not a regular file (a link or a folder)", path)
        else:
            plots.append(path.name)
    return [*REQUIRED_FILES, *plots]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a saved student folder to the Hub repo ``repo_id`` (created if needed) and return the repo URL.
    The folder is loaded first (a broken folder is never pushed); only :func:`hub_files` go up. ``revision``: a
    branch to push to (created if missing). A network or Hub failure is an ``OSError`` of one line."""
    folder = Path(folder)
    load_folder(folder)
    names = hub_files(folder)
    api = HfApi(token=token)
    try:
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
            allow_patterns=[glob.escape(name) for name in names],  # these names at the top level, nothing else
        )
    except HTTPError as err:  # the Hub client's network errors (no connection, timeouts, HTTP status errors)
        raise OSError(f"pushing {str(folder)!r} to the Hub repo {repo_id!r} failed ({type(err).__name__}): "
                      + " ".join(str(err).split())) from err
    logger.info("pushed %s to %s", folder, url)
    return str(url)
