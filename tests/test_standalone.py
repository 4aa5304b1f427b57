"""The repository stands alone: nothing in it refers to files beside it, and a copy of its files with nothing
beside it imports the package from the copy, finds the bundled students in the copy and steps a parameter with
one, without reading a single path next to the copy (checked by an audit hook in a subprocess). The whole suite
is guarded the same way by the audit hook of conftest.py."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("amalgam_plugin", "integrations", "tests", "benchmarks", "examples", "hub_models", "docs", "README.md")
SKIPPED_DIRS = {".git", "__pycache__", "build", "dist", ".venv", ".pytest_cache", ".ruff_cache", "runs"}
# paths beside the repository, and the names of design notes that live outside it (this file, which spells
# them out to look for them, is not scanned)
OUTSIDE = re.compile(r"""\.\./shared|["']shared["']|shared/reference|METHOD\.md|DESIGN\.md|METHOD §|\bDESIGN\b|"""
                     r"""INTEGRATION_NOTES""")


def repository_files() -> list[str]:
    """The repository's files (tracked, and new ones git does not ignore), relative to ROOT; without git, a walk
    that skips caches, build outputs and egg-info."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = sorted({n for n in out.decode().split("\0") if n})
    except (OSError, subprocess.SubprocessError):
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if not f.endswith(".pyc")]
    return [n for n in names if (ROOT / n).is_file()]  # tracked but deleted in the working tree: gone


def test_no_file_refers_to_paths_beside_the_repository():
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    hits = []
    for name in repository_files():
        if name.split("/", 1)[0] not in SCANNED or name == this:
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:  # weights, images
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


CHILD = r"""
import json, os, site, sys

CLONE = os.path.realpath(sys.argv[1])
WATCHED = [os.path.dirname(CLONE), os.path.realpath(sys.argv[2])]  # the copy's folder, the original's folder
reads = []


def inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


# the copy, and the interpreter's own folders unless they hold a watched folder (a virtualenv beside the repo)
INTERPRETER = {os.path.realpath(d) for d in (sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages())}
ALLOWED = [CLONE] + [d for d in INTERPRETER if not any(inside(w, d) for w in WATCHED)]


def audit(event, args):
    if event not in ("open", "os.listdir", "os.scandir") or not args or isinstance(args[0], int):
        return
    try:
        path = os.path.realpath(os.fsdecode(os.fspath("." if args[0] is None else args[0])))
    except (TypeError, ValueError):
        return
    if any(inside(path, folder) for folder in WATCHED) and not any(inside(path, d) for d in ALLOWED):
        reads.append(f"{event} {path}")


sys.addaudithook(audit)
# a plain checkout: drop the finder of the editable install, which maps amalgam_plugin's subpackages
# (hub_models, integrations) into the original repository
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]

import torch

import amalgam_plugin
from amalgam_plugin import hub
from amalgam_plugin.optim import AmalgamOptimizer

torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(4, 5))
opt = AmalgamOptimizer([p], student="paper-choice-large", warmup_steps=2)
losses = []
for _ in range(6):  # 2 warm-up steps, then the learned branch
    opt.zero_grad()
    loss = (p**2).sum()
    losses.append(loss.item())
    loss.backward()
    opt.step()
modules = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.startswith("amalgam_plugin")}
modules = {n: f for n, f in modules.items() if f}
print(json.dumps({
    "package": amalgam_plugin.__file__,
    "bundled_root": str(hub.bundled_root()),
    "identity": hub.student_identity(opt.student),
    "modules": modules,
    "losses": losses,
    "reads": sorted(set(reads)),
}))
"""


def test_a_copy_with_nothing_beside_it_runs_a_bundled_student(tmp_path):
    clone = tmp_path / "clone"
    for name in repository_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, clone / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone"]
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(clone), str(ROOT.parent)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    clone = clone.resolve()
    assert Path(report["package"]).resolve().is_relative_to(clone), report["package"]
    assert Path(report["bundled_root"]).resolve() == clone / "hub_models"
    assert report["modules"] and all(Path(f).resolve().is_relative_to(clone) for f in report["modules"].values())
    assert report["identity"]["source"] == "bundled" and report["identity"]["name"] == "paper-choice-large"
    losses = report["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert report["reads"] == [], "read beside the copy or in the original repository's folder:\n" + "\n".join(
        report["reads"]
    )


def test_every_third_party_import_is_declared_in_pyproject():
    """Each distribution the code, tests, benchmarks and examples import is a dependency (or a test extra) in
    pyproject.toml, so a fresh environment made from it runs everything."""
    import ast
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    local = {"amalgam_plugin"} | {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    imported = set()
    for name in repository_files():
        if name.endswith(".py"):
            for node in ast.walk(ast.parse((ROOT / name).read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local
    distributions = packages_distributions()
    missing = {m: distributions.get(m) for m in third_party
               if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
