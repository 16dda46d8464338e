"""staged_directory: what rankd unpacks, converts or quantizes appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.paths import staged_directory


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_finished_build_takes_the_name_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "models" / "model-abc"
    with staged_directory(target) as staging:
        assert staging.parent == target.parent
        assert staging.is_dir()
        (staging / "weights.bin").write_bytes(b"w")
        assert not target.exists()  # nothing under the name until the build is done
    assert (target / "weights.bin").read_bytes() == b"w"
    assert _leftovers(target.parent) == []


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build() -> None:
        with staged_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"h")
            raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        build()
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_another_process_s_finished_copy_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with staged_directory(target) as staging:
        (staging / "ours").write_text("ours")
        # Another process finishes the same model while this one builds.
        target.mkdir()
        (target / "theirs").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert _leftovers(tmp_path) == []


def test_an_unfinished_copy_in_the_way_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build() -> None:
        with staged_directory(target, finished=lambda t: (t / "MARKER").is_file()) as staging:
            (staging / "MARKER").write_text("done")
            target.mkdir()
            (target / "stray").write_text("no marker")

    with pytest.raises(OSError, match="not empty"):
        build()
    assert _leftovers(tmp_path) == []


def test_replace_overwrites_an_earlier_output(tmp_path: Path) -> None:
    target = tmp_path / "quantized"
    target.mkdir()
    (target / "old").write_text("old")
    with staged_directory(target, replace=True) as staging:
        (staging / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
