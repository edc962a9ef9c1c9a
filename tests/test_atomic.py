"""Files and folders that appear whole or not at all: every writer gives its files the mode open() would under
the umask; a folder is replaced whole or left as it was; a set of files in a shared folder is read whole even
when the writer stopped between its renames."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig
from lorakit.atomic import atomic_write, write_files, write_folder
from lorakit.methods import MethodOptions, get_method
from lorakit.quant import quantize, save_quantized
from support.models import make_llama, randomize_trainable

UMASK = 0o027  # not the usual 022: a writer that ignores the umask, or hard-codes 0644 / 0600, shows


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def _modes(root: Path) -> dict[str, int]:
    """The permission bits of every file and folder under `root` (included)."""
    paths = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): stat.S_IMODE(os.stat(p).st_mode) for p in paths}


def _assert_open_modes(root: Path) -> None:
    for name, mode in _modes(root).items():
        expected = (0o777 if (root / name).is_dir() else 0o666) & ~UMASK
        assert mode == expected, f"{name}: {oct(mode)}, open() would give {oct(expected)}"


def test_replaces_with_the_usual_file_mode(tmp_path, umask):
    target = tmp_path / "target.safetensors"
    atomic_write(target, lambda tmp: save_file({"x": torch.zeros(2)}, tmp))  # safetensors writes 0600 itself
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~UMASK


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("old")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["target.txt"]


def test_every_writer_gives_the_mode_open_would(tmp_path, umask):
    model = make_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")  # a new folder
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.yaml").write_text("r: 2\n")
    lorakit.save_adapter(model, tmp_path / "run")  # a folder holding other files
    method_model = make_llama(attention_bias=True)
    get_method("bitfit").apply(method_model, MethodOptions())
    get_method("bitfit").save(method_model, tmp_path / "method")
    quantized = make_llama()
    quantize(quantized, "nf4")
    save_quantized(quantized, tmp_path / "base" / "nf4.safetensors")
    merged = lorakit.merge_and_unload(model)
    write_folder(tmp_path / "merged", merged.save_pretrained)  # as `lorakit merge` writes a merged model
    for folder in ("adapter", "run", "method", "base", "merged"):
        _assert_open_modes(tmp_path / folder)


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "folder"
    write_folder(target, lambda tmp: [(tmp / n).write_text("old") for n in ("a", "b", "gone")])
    write_folder(target, lambda tmp: [(tmp / n).write_text("new") for n in ("a", "b")])
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "new", "b": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # the old folder and the temporary are gone


def test_a_failed_folder_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "folder"
    write_folder(target, lambda tmp: (tmp / "a").write_text("old"))

    def broken(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder(target, broken)
    assert (target / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_files_in_a_shared_folder_keep_the_other_files(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    write_files(tmp_path, {"w": lambda p: Path(p).write_text("1"), "c": lambda p: Path(p).write_text("1")})
    write_files(tmp_path, {"w": lambda p: Path(p).write_text("2"), "c": lambda p: Path(p).write_text("2")})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"results.json": "{}", "w": "2", "c": "2"}


def test_a_save_stopped_between_its_renames_is_read_whole_and_finished_by_the_next(tmp_path, monkeypatch):
    """Kill between the two renames of an adapter saved into a run folder: lorakit reads the new pair."""
    model = make_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj"]))
    (tmp_path / "results.json").write_text("{}")
    lorakit.save_adapter(model, tmp_path)
    randomize_trainable(model)
    new_tensors = lorakit.io.adapter_state_dict(model)
    lorakit.add_adapter(model, LoraConfig(r=2, alpha=7, target_modules=["q_proj"]), "other")
    real_replace, calls = os.replace, []

    def replace_then_die(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL after the first rename
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, tmp_path, "other")
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 2  # the old config in place
    config, tensors = lorakit.read_adapter(tmp_path)
    assert config.alpha == 7  # ... but the reader sees the new pair
    lorakit.save_adapter(model, tmp_path)  # the next save finishes the stopped one, then writes its own
    config, tensors = lorakit.read_adapter(tmp_path)
    assert config.alpha == 2 and all(
        torch.equal(tensors[k.removeprefix("base_model.model.")], v) for k, v in new_tensors.items()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "results.json",
    ]


def test_a_linked_folder_stays_a_link_to_the_replaced_folder(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    write_folder(real, lambda tmp: (tmp / "a").write_text("old"))
    link.symlink_to(real)
    write_folder(link, lambda tmp: (tmp / "a").write_text("new"))
    assert link.is_symlink() and (real / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
