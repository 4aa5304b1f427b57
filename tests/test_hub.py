"""Hub format: folder round-trip, bundled names, a repo id from a pre-seeded offline cache, push with only the
network calls of HfApi patched, model cards, and every bad input."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from unittest import mock

import pytest
import torch
import yaml
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file, save_file

from amalgam_plugin import cli, hub
from amalgam_plugin.cards import architecture_line
from amalgam_plugin.evaluate import Evaluation, RunResult
from amalgam_plugin.students import STUDENTS, ChoiceConfig, ChoiceNet, RNNProp, RNNPropConfig, StudentType
from amalgam_plugin.students.format import config_dict

PAPER_NAMES = ["paper-choice-large", "paper-choice-small", "paper-mean", "paper-minmax"]


def make_rnnprop(seed: int = 0, **config) -> RNNProp:
    student = RNNProp(RNNPropConfig(**config))
    student.reset_parameters(torch.Generator().manual_seed(seed))
    return student


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_evaluation() -> Evaluation:
    def result(name, seed, curve):
        return RunResult(name, seed, 50, [0, 25, 50], curve, [1.0] * 50)

    runs = {
        "student": [result("student", 0, [2.3, 0.5, 0.3]), result("student", 1, [2.3, 0.6, 0.35])],
        "adam 0.005 (paper)": [result("a", 0, [2.3, 0.7, 0.4]), result("a", 1, [2.3, 0.8, 0.5])],
    }
    return Evaluation("mlp", [0, 1], 50, 25, runs, reference="student", notes={"adam 0.005 (paper)": "fixed lr"})


# --- round-trips --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rnnprop", "choice"])
def test_folder_round_trip(tmp_path, kind):
    if kind == "rnnprop":
        student = make_rnnprop(provenance={"description": "test student"})
    else:
        student = ChoiceNet(ChoiceConfig(hidden_sizes=[8, 8]))
        student.reset_parameters(torch.Generator().manual_seed(1))
    folder = hub.save_student(student, tmp_path / "s")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["student_type"] == kind and config["format_version"] == hub.FORMAT_VERSION
    loaded = hub.load_student(folder)
    assert type(loaded) is type(student) and loaded.config == student.config
    assert same_weights(loaded, student)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    identity = hub.student_identity(loaded)
    assert identity["source"] == "local" and identity["name"] == str(folder.resolve())
    assert identity["sha256"] == hub.student_identity(student)["sha256"]


def test_identity_hash_tracks_weights_not_provenance():
    a = make_rnnprop(seed=0)
    assert hub.student_identity(a) == {
        "name": None,
        "revision": None,
        "source": "module",
        "sha256": hub.content_hash(a),
    }
    b = make_rnnprop(seed=0, provenance={"note": "same weights"})
    assert hub.content_hash(a) == hub.content_hash(b)
    with torch.no_grad():
        b.delta.bias += 1e-6
    assert hub.content_hash(a) != hub.content_hash(b)
    assert hub.content_hash(make_rnnprop(seed=0, warmup_steps=5)) != hub.content_hash(a)


def test_bundled_students_load_by_name():
    names = [name for name, _ in hub.list_bundled()]
    assert set(PAPER_NAMES) <= set(names)
    assert hub.DEFAULT_STUDENT in names
    assert all(desc for _, desc in hub.list_bundled())
    student = hub.load_student("paper-choice-large")
    assert isinstance(student, RNNProp) and student.config.warmup_steps == 100
    provenance = student.config.provenance
    assert provenance["source_file"].startswith("choice-large-") and provenance["selection"]["scores"]
    identity = hub.student_identity(student)
    assert identity["source"] == "bundled" and identity["name"] == "paper-choice-large"
    folder = hub.bundled_root() / "paper-choice-large"
    assert (folder / "model.safetensors").stat().st_size < 64_000


def fresh(kind: str, seed: int = 0) -> torch.nn.Module:
    entry = STUDENTS[kind]
    student = entry.module(entry.config())
    student.reset_parameters(torch.Generator().manual_seed(seed))
    return student


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_every_registered_type_round_trips_with_its_type(tmp_path, kind):
    """The registry key is the type config.json records, and loading builds that type's module again; the type's
    own from_pretrained refuses a folder of any other registered type."""
    student = fresh(kind)
    folder = hub.save_student(student, tmp_path / kind)
    assert json.loads((folder / "config.json").read_text())["student_type"] == kind
    loaded = hub.load_student(folder)
    assert type(loaded) is STUDENTS[kind].module and loaded.config == student.config and same_weights(loaded, student)
    for other in STUDENTS:
        if other != kind:
            with pytest.raises(ValueError, match=f"holds a '{kind}' student, not a '{other}' one"):
                STUDENTS[other].module.from_pretrained(folder)


def test_a_folder_whose_type_disagrees_with_its_weights_is_refused(tmp_path):
    folder = hub.save_student(fresh("rnnprop"), tmp_path / "s")
    edit_config(folder, student_type="lean")
    with pytest.raises(ValueError, match="does not match a lean student"):
        hub.load_student(folder)


def test_a_student_type_states_its_name_once():
    """A config class that does not state its own student_type, or card fields that are no config fields, cannot be
    registered."""
    @dataclass
    class Unnamed(RNNPropConfig):  # inherits rnnprop's name: it would save as an rnnprop
        extra: int = 1

    class Module(RNNProp):
        config_class = Unnamed

    with pytest.raises(ValueError, match="must state its own student_type"):
        StudentType(Module, "unnamed")

    @dataclass
    class Named(RNNPropConfig):
        student_type: ClassVar[str] = "named"
        card_fields: ClassVar[tuple[str, ...]] = ("hidden_sizes", "colour")

    Module.config_class = Named
    with pytest.raises(ValueError, match="card_fields names no config field: colour"):
        StudentType(Module, "named")


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_the_card_shows_every_architecture_field_of_the_type(kind):
    student = fresh(kind)
    text = hub.render_card(config_dict(student), card_fields=STUDENTS[kind].card_fields)
    line = next(line for line in text.splitlines() if line.startswith("**Architecture**"))
    assert line.startswith(f"**Architecture**: `{kind}` ")
    for field in STUDENTS[kind].card_fields:
        assert f"{field}={getattr(student.config, field)}" in line
    assert STUDENTS[kind].card_fields  # every type shows its architecture


@pytest.mark.parametrize("kind", sorted(STUDENTS))
def test_the_cards_how_to_use_says_what_lr_and_the_warm_up_mean_for_the_type(kind, tmp_path):
    """A normalized student's lr is AdamW's and it has no SGD warm-up; RNNProp's lr scales its trained update."""
    folder = hub.save_student(fresh(kind), tmp_path / kind)
    usage = (folder / "README.md").read_text().split("## How to use")[1].split("## Training")[0]
    assert f"# {STUDENTS[kind].config.lr_note}\n" in usage
    warmup = STUDENTS[kind].config().warmup_steps
    assert ("No fixed warm-up" in usage) == (warmup == 0) and (f"the first {warmup} steps are plain SGD" in usage) == (
        warmup > 0)
    if kind == "normalized":
        assert "lr is AdamW's" in usage and "multiplies" not in usage


@pytest.mark.parametrize("name", [name for name, _ in hub.list_bundled()])
def test_bundled_students_resave_byte_identically_and_their_cards_show_their_architecture_and_lr(tmp_path, name):
    bundled = hub.bundled_root() / name
    config = json.loads((bundled / "config.json").read_text())
    kind = STUDENTS[config["student_type"]]
    card = (bundled / "README.md").read_text().splitlines()
    assert architecture_line(config, kind.card_fields) in card and f"# {kind.config.lr_note}" in card
    folder = hub.save_student(hub.load_student(name), tmp_path / name)
    for file in ("model.safetensors", "config.json"):
        assert (folder / file).read_bytes() == (bundled / file).read_bytes(), file


# --- a repo id from a pre-seeded Hub cache, offline ---------------------------------------------------------


def seed_cache(cache: Path, repo_id: str, commits: dict[str, torch.nn.Module], main: str) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    for commit, student in commits.items():
        hub.save_student(student, repo / "snapshots" / commit)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_repo_id_from_preseeded_cache_offline(tmp_path, offline):
    first, second = "a" * 40, "b" * 40
    old, new = make_rnnprop(seed=1), make_rnnprop(seed=2)
    seed_cache(tmp_path, "acme/amalgam-tiny", {first: old, second: new}, main=second)

    latest = hub.load_student("acme/amalgam-tiny", cache_dir=tmp_path)
    assert same_weights(latest, new)
    assert hub.student_identity(latest) | {"sha256": None} == {
        "name": "acme/amalgam-tiny",
        "revision": second,
        "source": "hub",
        "sha256": None,
    }

    pinned = hub.load_student("acme/amalgam-tiny", revision=first, cache_dir=tmp_path)
    assert same_weights(pinned, old) and hub.student_identity(pinned)["revision"] == first

    with pytest.raises(FileNotFoundError, match="acme/not-cached"):
        hub.load_student("acme/not-cached", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="c{40}"):
        hub.load_student("acme/amalgam-tiny", revision="c" * 40, cache_dir=tmp_path)


def test_a_snapshot_folder_linking_out_of_the_cache_is_refused(tmp_path, offline):
    """A Hub cache whose snapshot folder is itself a link to a folder elsewhere: nothing is loaded from there."""
    elsewhere = hub.save_student(make_rnnprop(seed=6), tmp_path / "elsewhere")
    repo = tmp_path / "cache" / "models--acme--linked"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("f" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("f" * 40)).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="links outside its repository"):
        hub.load_student("acme/linked", cache_dir=tmp_path / "cache")


def test_repo_id_with_default_cache_monkeypatched(tmp_path, offline, monkeypatch):
    commit = "d" * 40
    seed_cache(tmp_path, "acme/amalgam-tiny", {commit: make_rnnprop(seed=3)}, main=commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    student = hub.load_student("acme/amalgam-tiny", local_files_only=True)
    assert same_weights(student, make_rnnprop(seed=3))


def test_mixin_round_trip_goes_through_the_one_hub_format(tmp_path, offline):
    """The huggingface_hub mixin every student inherits writes and reads exactly amalgam_plugin.hub's format."""
    student = make_rnnprop(seed=4, warmup_steps=7)
    student.save_pretrained(tmp_path / "mixin")
    config = json.loads((tmp_path / "mixin" / "config.json").read_text())
    assert config["student_type"] == "rnnprop" and config["warmup_steps"] == 7 and config["format_version"] == 1
    assert (tmp_path / "mixin" / "README.md").read_text().startswith("---\n")  # our model card, not the mixin's
    assert same_weights(hub.load_folder(tmp_path / "mixin"), student)

    loaded = RNNProp.from_pretrained(tmp_path / "mixin")
    assert same_weights(loaded, student) and loaded.config.warmup_steps == 7 and not loaded.training
    paper = RNNProp.from_pretrained("paper-choice-large")
    assert paper.config.hidden_sizes == [20, 20] and hub.student_identity(paper)["source"] == "bundled"

    seed_cache(tmp_path / "cache", "acme/mixin", {"e" * 40: student}, main="e" * 40)
    assert same_weights(RNNProp.from_pretrained("acme/mixin", cache_dir=tmp_path / "cache"), student)

    with pytest.raises(ValueError, match="holds a 'rnnprop' student, not a 'choice' one"):
        ChoiceNet.from_pretrained(tmp_path / "mixin")
    (tmp_path / "mixin" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RNNProp.from_pretrained(tmp_path / "mixin")


def test_mixin_push_to_hub_uploads_the_hub_format(tmp_path):
    uploaded = {}

    def upload_folder(self, *, folder_path, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        return mock.Mock(commit_url="https://huggingface.co/acme/x/commit/0")

    repo_url = mock.Mock(repo_id="acme/x")
    with mock.patch.object(HfApi, "create_repo", return_value=repo_url), \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        make_rnnprop(seed=5).push_to_hub("acme/x", token="not-a-token")
    assert {"config.json", "model.safetensors", "README.md"} <= set(uploaded)
    assert json.loads(uploaded["config.json"])["student_type"] == "rnnprop"


# --- push ---------------------------------------------------------------------------------------------------


def test_push_folder_uploads_the_hub_files(tmp_path):
    folder = hub.save_student(
        make_rnnprop(), tmp_path / "s", card={"title": "Tiny", "pool": "small"}, evaluation=tiny_evaluation()
    )
    (folder / "pytorch_model.bin").write_bytes(b"not uploaded")
    (folder / "scratch.txt").write_text("not uploaded")
    uploaded: dict[str, bytes] = {}
    calls = {}

    def fake_upload(self, *, folder_path, repo_id, allow_patterns=None, **kwargs):
        calls["upload"] = dict(repo_id=repo_id, **kwargs)
        for path in Path(folder_path).iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(path.name, p) for p in allow_patterns):
                uploaded[path.name] = path.read_bytes()
        return "https://huggingface.co/acme/amalgam-tiny/commit/0"

    def fake_create(self, repo_id, **kwargs):
        calls["create"] = dict(repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    with (
        mock.patch.object(HfApi, "create_repo", fake_create),
        mock.patch.object(HfApi, "upload_folder", fake_upload),
    ):
        url = hub.push_folder(folder, "acme/amalgam-tiny", token="hf_test", private=True)
    assert url == "https://huggingface.co/acme/amalgam-tiny"
    assert calls["create"]["exist_ok"] is True and calls["create"]["private"] is True
    assert calls["upload"]["repo_id"] == "acme/amalgam-tiny"
    assert set(uploaded) == {"README.md", "config.json", "model.safetensors", "heldout_loss.png"}
    meta = yaml.safe_load(uploaded["README.md"].decode().split("---")[1])
    assert meta["library_name"] == "amalgam-plugin" and meta["license"] == "mit"
    config = json.loads(uploaded["config.json"])
    assert config["student_type"] == "rnnprop" and config["format_version"] == 1
    (tmp_path / "w.safetensors").write_bytes(uploaded["model.safetensors"])
    assert set(load_file(tmp_path / "w.safetensors")) == set(make_rnnprop().state_dict())


def upload_as_the_hub_client_filters(uploaded: dict[str, bytes]):
    """HfApi.upload_folder's own selection of files (every file under the folder, filtered by its patterns)."""
    from huggingface_hub.utils import filter_repo_objects

    def upload_folder(self, *, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            uploaded[name] = (root / name).read_bytes()
        return "https://huggingface.co/acme/x/commit/0"

    return upload_folder


def test_push_uploads_only_the_hub_files_never_links_or_the_training_folder(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a file of the machine")
    folder = hub.save_student(make_rnnprop(), tmp_path / "s", card={"title": "Tiny"}, evaluation=tiny_evaluation())
    (folder / "leak.png").symlink_to(secret)
    (folder / "training").mkdir()
    for name in ("curve.png", "README.md", "config.json", "checkpoint.safetensors"):
        (folder / "training" / name).write_text("run files")
    (folder / "notes.txt").write_text("mine")
    uploaded: dict[str, bytes] = {}
    with mock.patch.object(HfApi, "create_repo", return_value="https://huggingface.co/acme/x"), \
            mock.patch.object(HfApi, "upload_folder", upload_as_the_hub_client_filters(uploaded)):
        hub.push_folder(folder, "acme/x")
    assert set(uploaded) == {"README.md", "config.json", "model.safetensors", "heldout_loss.png"}
    assert uploaded["config.json"] == (folder / "config.json").read_bytes()


def test_push_refuses_a_required_file_that_is_a_link(tmp_path):
    folder = hub.save_student(make_rnnprop(), tmp_path / "s")
    os.replace(folder / "README.md", folder / "card.md")
    (folder / "README.md").symlink_to(folder / "card.md")
    with mock.patch.object(HfApi, "create_repo") as create, mock.patch.object(HfApi, "upload_folder") as upload:
        with pytest.raises(ValueError, match="README.md' is a symbolic link"):
            hub.push_folder(folder, "acme/x")
    create.assert_not_called()
    upload.assert_not_called()


def test_push_without_a_network_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """Offline mode off and no connection: the Hub client's own network error becomes one line, exit status 2."""
    import importlib

    from huggingface_hub.errors import HTTPError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    connect_error = importlib.import_module(HTTPError.__module__).ConnectError  # httpx's, as the client uses it
    folder = hub.save_student(make_rnnprop(), tmp_path / "s")
    with mock.patch.object(HfApi, "create_repo", side_effect=connect_error("[Errno -3] name resolution failed")):
        assert cli.main(["push", str(folder), "acme/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "acme/x" in err and "ConnectError" in err and "name resolution failed" in err


def test_push_refuses_a_broken_folder(tmp_path):
    folder = hub.save_student(make_rnnprop(), tmp_path / "s")
    (folder / "model.safetensors").unlink()
    with (
        mock.patch.object(HfApi, "create_repo") as create,
        mock.patch.object(HfApi, "upload_folder") as upload,
    ):
        with pytest.raises(FileNotFoundError, match="model.safetensors"):
            hub.push_folder(folder, "acme/x")
    create.assert_not_called()
    upload.assert_not_called()


# --- model cards --------------------------------------------------------------------------------------------


def test_model_card_contents(tmp_path):
    card = {
        "title": "Tiny student",
        "description": "A test.",
        "pool": [{"name": "adam", "lr": 0.005}, {"name": "rmsprop", "lr": 0.005}],
        "mechanism": "choice",
        "problem": "Train CNN on MNIST",
        "data_split": "training digits only",
        "recipe": {"preset": "quick", "unroll": 20},
        "seeds": "meta-training seed 0; evaluation seeds 0, 1",
        "command": "amalgam amalgamate --preset quick",
        "license_notice": "MIT License\n\nCopyright (c) 2021 VITA-Group",
        "notes": "some notes",
        "tags": ["extra-tag"],
    }
    folder = hub.save_student(make_rnnprop(), tmp_path / "s", card=card, evaluation=tiny_evaluation())
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "amalgam-plugin" and meta["license"] == "mit"
    assert {"arxiv:2203.06474", "extra-tag", "learned-optimizer"} <= set(meta["tags"])
    for heading in [
        "# Tiny student",
        "## Intended use",
        "## Limits",
        "## How to use",
        "## Training",
        "## Reproduce",
        "## Evaluation",
        "## Notes",
        "## License",
        "## Citation",
    ]:
        assert f"\n{heading}\n" in text, heading
    for fragment in [
        "**Teacher pool**",
        "name=adam, lr=0.005",
        "**Mechanism**: choice",
        "**Data split**",
        "`preset`: quick",
        "amalgam amalgamate --preset quick",
        "Copyright (c) 2021 VITA-Group",
        "arxiv.org/abs/2203.06474",
        "Optimizer Amalgamation",
        "![held-out loss against steps](heldout_loss.png)",
        "| optimizer | best log held-out |",
        "| student |",
        "- adam 0.005 (paper): fixed lr",
    ]:
        assert fragment in text, fragment
    assert (folder / "heldout_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def evaluate_into_card(tmp_path: Path, card_folder: Path) -> int:
    """A tiny ``amalgam evaluate --card`` (plain SGD, 2 steps, 1 seed, no baselines)."""
    return cli.main(["evaluate", "torch.optim.SGD:lr=0.1", "--problems", "mlp", "--seeds", "1", "--steps", "2",
                     "--eval-every", "1", "--no-baselines", "--workers", "1", "--out", str(tmp_path / "eval"),
                     "--card", str(card_folder)])


def test_evaluate_card_refuses_a_folder_that_is_not_a_students(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("# my notes\n")
    assert evaluate_into_card(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a student folder" in err and "model.safetensors" in err
    assert (folder / "README.md").read_text() == "# my notes\n" and not (tmp_path / "eval").exists()


def test_evaluate_card_replaces_a_link_under_a_plot_name_never_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's file elsewhere")
    folder = hub.save_student(make_rnnprop(), tmp_path / "s", card={"title": "Tiny"})
    (folder / "evaluate-mlp-curves.png").symlink_to(outside)
    assert evaluate_into_card(tmp_path, folder) == 0
    assert outside.read_text() == "a user's file elsewhere"
    plot = folder / "evaluate-mlp-curves.png"
    assert not plot.is_symlink() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![held-out loss against steps](evaluate-mlp-curves.png)" in (folder / "README.md").read_text()


def test_unknown_card_key_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown model-card keys colour.*valid keys"):
        hub.save_student(make_rnnprop(), tmp_path / "s", card={"colour": "red"})
    assert not (tmp_path / "s" / "config.json").exists()


# --- bad input ----------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    return hub.save_student(make_rnnprop(), tmp_path / "s")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"hidden_sizes": [3000, 3000]}, r"hidden_sizes\[0\] must be an integer in \[1, 256\]"),
    ({"hidden_sizes": [100000, 100000]}, "hidden_sizes"),
    ({"hidden_sizes": [-5]}, "hidden_sizes"),
    ({"hidden_sizes": []}, "hidden_sizes must be a list of 1 to 4"),
    ({"hidden_sizes": "20"}, "hidden_sizes"),
    ({"beta1": 1}, "beta1"),
    ({"output_scale": float("nan")}, "output_scale"),
    ({"epsilon": -1}, "epsilon"),
    ({"beta2": "0.999"}, "beta2"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 1.5}, "warmup_steps"),
    ({"warmup_lr": float("inf")}, "warmup_lr"),
    ({"provenance": []}, "provenance"),
    ({"student_type": ["rnnprop"]}, "unknown student_type"),
])
def test_hostile_config_is_refused_before_anything_is_built(saved, changes, message):
    """Every field's type and range is checked first: nothing huge is allocated, nothing broken is built."""
    edit_config(saved, **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        hub.load_student(saved)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("changes,message", [
    ({"time_scale": 0}, "time_scale"),
    ({"pool": [["bogus", {}]]}, "unknown teacher 'bogus'"),
    ({"pool": [[["adam"], {}]]}, "must be a name"),
    ({"pool": [["adam", {"lr": "0.01"}]]}, r"pool\[0\]\.lr"),
    ({"pool": []}, "pool must be a list of 1 to 32"),
])
def test_hostile_choice_config_is_refused(tmp_path, changes, message):
    folder = hub.save_student(ChoiceNet(), tmp_path / "c")
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        hub.load_student(folder)


def test_cli_reports_a_hostile_folder_in_one_line(saved):
    edit_config(saved, hidden_sizes=[3000, 3000])
    result = subprocess.run([sys.executable, "-m", "amalgam_plugin.cli", "push", str(saved), "acme/x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "hidden_sizes[0] must be an integer" in result.stderr


def test_deep_or_huge_config_json_is_refused(saved):
    (saved / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        hub.load_student(saved)
    (saved / "config.json").write_text(json.dumps({"format_version": 1, "pad": "x" * 2 * 1024**2}))
    with pytest.raises(ValueError, match="a student config is at most"):
        hub.load_student(saved)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_weights_of_a_non_float_dtype_are_refused(saved, dtype):
    tensors = load_file(saved / "model.safetensors")
    tensors["delta.bias"] = tensors["delta.bias"].to(dtype)
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(ValueError, match="must be floating point; got delta.bias"):
        hub.load_student(saved)


def test_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        hub.load_student(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="paper-choice-large"):  # lists the bundled names
        hub.load_student("no-such-student")
    with pytest.raises(FileNotFoundError, match="no student folder"):
        hub.load_student("./relative/missing")
    with pytest.raises(FileNotFoundError, match="no student folder"):
        hub.load_folder(tmp_path / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        hub.load_student(saved)


@pytest.mark.parametrize("content", [b"garbage", b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"])
def test_corrupt_weights(saved, content):
    (saved / "model.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match="corrupt"):
        hub.load_student(saved)


def test_truncated_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        hub.load_student(saved)


def test_unknown_student_type(saved):
    edit_config(saved, student_type="transformer")
    with pytest.raises(ValueError, match="unknown student_type 'transformer'.*rnnprop, lean, choice"):
        hub.load_student(saved)


def test_newer_format_version(saved):
    edit_config(saved, format_version=hub.FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="format_version 2, newer"):
        hub.load_student(saved)
    edit_config(saved, format_version="1")
    with pytest.raises(ValueError, match="integer format_version"):
        hub.load_student(saved)


def test_missing_and_unreadable_config(saved):
    (saved / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        hub.load_student(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hub.load_student(saved)


def test_mismatched_shapes(saved):
    edit_config(saved, hidden_sizes=[10, 10])
    with pytest.raises(ValueError, match=r"shape mismatch.*recurrent\.0\.kernel: expected \(2, 40\), got \(2, 80\)"):
        hub.load_student(saved)


def test_missing_and_unexpected_keys(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["extra.weight"] = tensors.pop("delta.bias")
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['delta\.bias'\].*unexpected keys \['extra\.weight'\]"):
        hub.load_student(saved)


def test_non_finite_weights(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["delta.bias"] = torch.tensor([float("nan")])
    save_file(tensors, saved / "model.safetensors")
    with pytest.raises(ValueError, match="non-finite"):
        hub.load_student(saved)


class _Bomb:
    """Unpickling this would create a marker file: proof that pickle is never loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\).*never loaded"):
        hub.load_student(folder)  # no config.json either
    edit = hub.save_student(make_rnnprop(), tmp_path / "tmp")
    os.replace(edit / "config.json", folder / "config.json")
    with pytest.raises(ValueError, match="only pickle weights.*never loaded"):
        hub.load_student(folder)
    assert not marker.exists()


def test_a_file_is_not_a_folder(saved):
    with pytest.raises(ValueError, match="is a file, not a student folder"):
        hub.load_student(saved / "config.json")


# --- packaging -------------------------------------------------------------------------------------------------


def test_wheel_ships_bundled_students_and_integrations(tmp_path):
    """Build the wheel from a copy of the sources (the shared tree stays clean), then load a bundled student
    from the unpacked wheel alone, as right after ``pip install``."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(root / name, src / name)
    for name in ["amalgam_plugin", "integrations", "hub_models"]:
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", "dist"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (src / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for folder in PAPER_NAMES:
        for file in ["config.json", "model.safetensors", "README.md", "heldout_loss.png"]:
            assert f"amalgam_plugin/hub_models/{folder}/{file}" in names
    assert "amalgam_plugin/integrations/__init__.py" in names
    assert "amalgam_plugin/engine/baseline_runs.json" in names  # the recorded baseline runs the card reuses
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import amalgam_plugin.hub as h; s = h.load_student('paper-choice-large'); "
        "print(h.bundled_root()); print(type(s).__name__)"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    bundled_root, kind = out.stdout.split()
    assert Path(bundled_root).is_relative_to(site) and kind == "RNNProp"
