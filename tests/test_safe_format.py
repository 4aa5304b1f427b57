"""No pickle and no remote code anywhere in the package: students and checkpoints are safetensors and JSON only.
Checked on the syntax tree of every module of amalgam_plugin and the integrations."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted([*ROOT.joinpath("amalgam_plugin").rglob("*.py"), *ROOT.joinpath("integrations").rglob("*.py")])
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def findings(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "torch.load", "pickle.load", "pickle.loads"):
                found.append(f"{name}(...)")
            if name in ("np.load", "numpy.load") and not (
                isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value is False
            ):
                found.append(f"{name}(...) without allow_pickle=False")
            if isinstance(keywords.get("trust_remote_code"), ast.Constant) and keywords["trust_remote_code"].value:
                found.append("trust_remote_code=True")
    return found


def test_the_scan_finds_what_it_looks_for():
    unsafe = "import pickle\nimport numpy as np\ntorch.load('x')\nnp.load('y')\neval('1')\nf(trust_remote_code=True)"
    assert len(findings(ast.parse(unsafe))) == 5
    assert findings(ast.parse("np.load('y', allow_pickle=False)\nmodel.eval()")) == []


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_and_no_remote_code(module):
    assert findings(ast.parse(module.read_text())) == []
