"""`amalgam list` and `amalgam push` (only the HfApi calls that reach the network are patched)."""

import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

from huggingface_hub import HfApi

from amalgam_plugin import cli, hub


def test_list_prints_one_tab_separated_line_per_bundled_student_and_nothing_else():
    result = subprocess.run([sys.executable, "-m", "amalgam_plugin.cli", "list"], capture_output=True, text=True,
                            timeout=120, check=True)
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [name for name, _ in hub.list_bundled()]
    assert {"paper-choice-large", "paper-choice-small", "paper-minmax", "paper-mean"} <= {
        line.split("\t")[0] for line in lines}
    assert all(line.count("\t") == 1 and line.split("\t")[1] for line in lines)


def test_push_uploads_the_folder(tmp_path, capsys):
    folder = Path(shutil.copytree(hub.bundled_root() / "paper-mean", tmp_path / "paper-mean"))
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, allow_patterns=None, **kwargs):
        uploads.append((Path(folder_path), repo_id, allow_patterns))

    with mock.patch.object(HfApi, "create_repo", create_repo), mock.patch.object(HfApi, "upload_folder",
                                                                                 upload_folder):
        assert cli.main(["push", str(folder), "acme/paper-mean"]) == 0
    assert uploads == [(folder, "acme/paper-mean", uploads[0][2])]
    assert "config.json" in uploads[0][2] and "model.safetensors" in uploads[0][2]
    assert capsys.readouterr().out.strip() == "https://huggingface.co/acme/paper-mean"
