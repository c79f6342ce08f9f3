from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dtune import Checkpoint


def test_dict_checkpoint_round_trips_tensors_with_weights_only(tmp_path):
    state = {"w": torch.arange(4.0), "step": 3, "nested": {"lr": 0.1}}
    written = Checkpoint.from_dict(state).write_to(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "data.pt").exists()
    loaded = Checkpoint(written.path).to_dict()
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3 and loaded["nested"] == {"lr": 0.1}


class Evil:
    pass


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    Checkpoint.from_dict({"obj": Evil()}).write_to(tmp_path / "c")
    with pytest.raises(Exception, match="[Ww]eights only"):
        Checkpoint(tmp_path / "c").to_dict()


def test_directory_checkpoint_is_copied_atomically_and_replaces(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes(b"abc")
    target = tmp_path / "trial" / "checkpoint_000001"
    target.parent.mkdir()
    Checkpoint.from_directory(source).write_to(target)
    (source / "model.bin").write_bytes(b"new")
    Checkpoint.from_directory(source).write_to(target)
    assert (target / "model.bin").read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint_000001"], "no temp dir left"


def test_from_directory_needs_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Checkpoint.from_directory(tmp_path / "missing")


def test_directory_checkpoint_to_dict_says_to_use_the_path(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="checkpoint.path"):
        Checkpoint.from_directory(tmp_path).to_dict()


def test_as_directory_writes_a_dict_checkpoint():
    path = Checkpoint.from_dict({"a": 1}).as_directory()
    assert Path(path).is_dir() and os.listdir(path)
