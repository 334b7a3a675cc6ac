"""qwen2.files: a file or folder is replaced whole or not at all, its bytes reach the disk before
the rename and the rename before we go on, and torch files are read without running code."""

import os

import pytest
import torch

from qwen2 import files
from qwen2.errors import WeightsError
from tests.conftest import PickledPayload


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the old, complete file")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"the old, complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_an_interrupt_midway_leaves_the_old_file_too(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")

    def interrupted(tmp):
        tmp.write_text('{"half":')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(path, interrupted)
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_completed_write_replaces_the_file_with_the_mode_a_plain_write_gives(tmp_path):
    path, plain = tmp_path / "a.json", tmp_path / "plain.json"
    path.write_text("old")
    files.write_text_atomically(path, "new ✓")
    plain.write_text("x")
    assert path.read_text(encoding="utf-8") == "new ✓"
    # not mkstemp's 0600: a shared cache or output stays readable by whoever could read it before
    assert path.stat().st_mode == plain.stat().st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "plain.json"]


def test_bytes_are_flushed_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(files, "fsync", lambda p: events.append(("fsync", p)))
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: events.append(("replace", b)) or real_replace(a, b))
    path = tmp_path / "trainer_state.pt"
    files.write_text_atomically(path, "state")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].parent == tmp_path and events[0][1] != path  # the temporary file, flushed
    assert events[1][1] == path and events[2][1] == tmp_path  # then renamed, then its folder flushed


def test_a_folder_is_published_with_every_file_flushed_and_failure_keeps_the_old_one(tmp_path, monkeypatch):
    folder = tmp_path / "step-4"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def fail(tmp):
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError):
        files.write_folder_atomically(folder, fail)
    assert [p.name for p in folder.iterdir()] == ["old.txt"] and [p.name for p in tmp_path.iterdir()] == ["step-4"]

    flushed = []
    monkeypatch.setattr(files, "fsync", lambda p: flushed.append(os.path.basename(p)))
    files.write_folder_atomically(folder, lambda tmp: [(tmp / n).write_text(n) for n in ("a", "b")])
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"]
    assert {"a", "b"} <= set(flushed) and flushed[-1] == tmp_path.name  # the parent, after the rename


def test_load_plain_refuses_a_file_that_would_run_code_and_does_not_run_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"step": 3, "payload": PickledPayload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"evil.pt was not loaded: .*open.* could run code.*delete it"):
        files.load_plain(tmp_path / "evil.pt", "delete it")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: the unsafe reader runs it
    assert marker.exists()


def test_load_plain_names_a_corrupt_or_truncated_file(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsError, match="garbage.pt is corrupt .*; recompute it"):
        files.load_plain(tmp_path / "garbage.pt", "recompute it")
    torch.save({"t": torch.ones(1000)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:300])
    with pytest.raises(WeightsError, match="cut.pt is corrupt or truncated .*; recompute it"):
        files.load_plain(tmp_path / "cut.pt", "recompute it")


def test_load_plain_reads_tensors_and_plain_values(tmp_path):
    state = {"step": 4, "rng": torch.get_rng_state(), "python": (3, (1, 2), None), "lr": [0.5]}
    torch.save(state, tmp_path / "s.pt")
    loaded = files.load_plain(tmp_path / "s.pt", "")
    assert loaded["step"] == 4 and loaded["python"] == (3, (1, 2), None) and torch.equal(loaded["rng"], state["rng"])
