"""Hostile and damaged files for every reader: adapter folders (and adapter contents), method folders,
checkpoints, quantized bases, JSON and YAML configs. Each is refused with one line naming the file, leaves
the model exactly as it was and the files on disk as they were, runs no pickled code, and allocates nothing
for the tensors a lying header declares."""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterFileError, LoraConfig
from lorakit.io import read_adapter_contents
from lorakit.methods import MethodOptions, get_method, load_trained
from lorakit.quant import load_quantized, quantize, save_quantized
from lorakit.safe_files import layout_of_file
from lorakit.train.checkpoint import Checkpointer, latest_checkpoint
from lorakit.train.config import RunConfig, RunError
from lorakit.train.data import Collator
from lorakit.train.loop import LoopSettings, train_adapter
from support.files import random_token_rows
from support.models import make_llama, randomize_trainable

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TB = 2**40


# -- writing hostile files --------------------------------------------------------------------------
def raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file written byte by byte: 8-byte length, JSON header, data (whatever they claim)."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


def _oversized_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", TB) + b"{}")


def _terabyte_tensor(path: Path) -> None:
    raw_safetensors(path, {"w": {"dtype": "F32", "shape": [2**38], "data_offsets": [0, TB]}}, b"\0" * 16)


def _shape_beyond_offsets(path: Path) -> None:
    raw_safetensors(path, {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 16]}}, b"\0" * 16)


def _overlapping(path: Path) -> None:
    header = {k: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for k in ("a", "b")}
    raw_safetensors(path, header, b"\0" * 16)


def _malformed_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 9) + b'{"a": [1,' + b"\0" * 8)


def _unknown_dtype(path: Path) -> None:
    raw_safetensors(path, {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")


def _rewritten(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """A damage that rewrites every tensor of a valid file with `change` (same names and shapes)."""

    def damage(path: Path) -> None:
        tensors = load_file(path)
        save_file({k: change(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})

    return damage


def _nan_filled(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if t.is_floating_point() else t


def _inf_in_one(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    if t.is_floating_point():
        t.view(-1)[-1] = float("inf")
    return t


WEIGHT_DAMAGES = [
    pytest.param(_truncated, "does not fit its header", id="truncated"),
    pytest.param(_oversized_header, "header of 1099511627776 bytes, over the", id="oversized-header"),
    pytest.param(_terabyte_tensor, "tensors need 1099511627776 bytes of data, the file holds 16", id="1TB-tensor"),
    pytest.param(_shape_beyond_offsets, "declares shape .1000. of F32 .4000 bytes. but a byte range of 16", id="shape"),
    pytest.param(_overlapping, "starts at byte 0, expected 8", id="overlap"),
    pytest.param(_malformed_header, "not valid JSON", id="malformed-header"),
    pytest.param(_unknown_dtype, "unsupported dtype 'F4'", id="unknown-dtype"),
    pytest.param(_rewritten(lambda t: t.to(torch.int32)), "is I32, expected one of", id="wrong-dtype"),
    pytest.param(_rewritten(_nan_filled), "NaN or infinite", id="nan"),
    pytest.param(_rewritten(_inf_in_one), "NaN or infinite", id="inf"),
]


class Payload:
    """A pickle that would create `marker` when unpickled with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(root.rglob("*"))
        if not p.is_symlink()
    }


def _one_line(error: pytest.ExceptionInfo, names: str) -> None:
    message = str(error.value)
    assert "\n" not in message and names in message, message


@pytest.fixture
def refused(unchanged):
    """`refused(model, folder, call, error, match, names)`: `call()` raises `error` (one line, naming `names`),
    the model and every file under `folder` stay as they were."""

    def check(model, folder: Path, call: Callable[[], object], error: type, match: str, names: str) -> None:
        before = _tree_digest(folder)
        with unchanged(model), pytest.raises(error, match=match) as info:
            call()
        _one_line(info, names)
        assert _tree_digest(folder) == before

    return check


# -- adapter folders and contents ---------------------------------------------------------------
@pytest.fixture
def adapter(tmp_path) -> Path:
    model = make_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_trainable(model)
    return lorakit.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize(("damage", "match"), WEIGHT_DAMAGES)
def test_damaged_adapter_weights_are_refused(adapter, llama, refused, damage, match):
    damage(adapter / ADAPTER_WEIGHTS)
    refused(llama, adapter, lambda: lorakit.load_adapter(llama, adapter), AdapterFileError, match, ADAPTER_WEIGHTS)
    contents = (adapter / ADAPTER_CONFIG).read_bytes(), (adapter / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(AdapterFileError, match=match) as info:
        read_adapter_contents(*contents, where="uploads/a")
    _one_line(info, f"uploads/a/{ADAPTER_WEIGHTS}")


def test_a_terabyte_header_allocates_nothing(adapter):
    _terabyte_tensor(adapter / ADAPTER_WEIGHTS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(20):
        with pytest.raises(AdapterFileError, match="does not fit its header"):
            lorakit.read_adapter(adapter)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 50 * 1024  # KiB: under 50 MB


CONFIG_DAMAGES = [
    pytest.param(b'{"r": 2, "lora_alpha": ', "not valid JSON", id="malformed"),
    pytest.param(b"\xff\xfe not utf-8", "not valid JSON", id="not-utf8"),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "not valid JSON", id="deeply-nested"),
    pytest.param(b'{"r": "eight", "target_modules": ["q_proj"]}', "r must be a positive integer", id="wrong-type"),
    pytest.param(b'{"r": 2, "target_modules": 5}', "target_modules must be", id="wrong-type-list"),
    pytest.param(b'{"r": 2, "target_modules": ["q", "v"], "rank_pattern": [1]}', "rank_pattern must map", id="list"),
    pytest.param(b'{"r": 2, "x": "' + b"a" * 2**21 + b'"}', "over the 1048576-byte limit", id="huge"),
]


@pytest.mark.parametrize(("text", "match"), CONFIG_DAMAGES)
def test_damaged_adapter_configs_are_refused(adapter, llama, refused, text, match):
    (adapter / ADAPTER_CONFIG).write_bytes(text)
    refused(llama, adapter, lambda: lorakit.load_adapter(llama, adapter), AdapterFileError, match, ADAPTER_CONFIG)
    with pytest.raises(AdapterFileError, match=match):
        read_adapter_contents(text, (adapter / ADAPTER_WEIGHTS).read_bytes(), where="uploads/a")


def test_symlinked_adapter_files_to_other_content_or_in_a_loop_are_refused(adapter, llama, refused, tmp_path):
    elsewhere = tmp_path / "secret.txt"
    elsewhere.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (adapter / ADAPTER_WEIGHTS).unlink()
    (adapter / ADAPTER_WEIGHTS).symlink_to(elsewhere)
    load = lambda: lorakit.load_adapter(llama, adapter)  # noqa: E731
    refused(llama, adapter, load, AdapterFileError, "safetensors header of .* bytes, over the", ADAPTER_WEIGHTS)
    (adapter / ADAPTER_CONFIG).unlink()
    (adapter / ADAPTER_CONFIG).symlink_to(adapter / ADAPTER_CONFIG)  # a link to itself
    refused(llama, adapter, load, AdapterFileError, f"has no {ADAPTER_CONFIG}", ADAPTER_CONFIG)


def test_a_pickle_bearing_legacy_adapter_runs_nothing(adapter, llama, refused, tmp_path):
    marker = tmp_path / "pwned"
    (adapter / ADAPTER_WEIGHTS).unlink()
    torch.save({"x": Payload(marker)}, adapter / "adapter_model.bin")
    load = lambda: lorakit.load_adapter(llama, adapter)  # noqa: E731
    refused(llama, adapter, load, AdapterFileError, "adapter_model.bin cannot be read", "adapter_model.bin")
    assert not marker.exists()


# -- method folders -------------------------------------------------------------------------------
@pytest.fixture
def method_folder(tmp_path) -> Path:
    model = make_llama(attention_bias=True)
    get_method("bitfit").apply(model, MethodOptions())
    randomize_trainable(model)
    return get_method("bitfit").save(model, tmp_path / "bitfit")


@pytest.mark.parametrize(("damage", "match"), WEIGHT_DAMAGES)
def test_damaged_method_weights_are_refused(method_folder, refused, damage, match):
    damage(method_folder / "method_model.safetensors")
    model = make_llama(attention_bias=True)
    refused(model, method_folder, lambda: load_trained(model, method_folder), ValueError, match, "method_model")


@pytest.mark.parametrize(("text", "match"), CONFIG_DAMAGES[:3] + CONFIG_DAMAGES[-1:])
def test_damaged_method_configs_are_refused(method_folder, refused, text, match):
    (method_folder / "method_config.json").write_bytes(text)
    model = make_llama(attention_bias=True)
    refused(model, method_folder, lambda: load_trained(model, method_folder), ValueError, match, "method_config")


# -- quantized bases ------------------------------------------------------------------------------
@pytest.fixture
def quantized_file(tmp_path) -> Path:
    model = make_llama()
    quantize(model, "nf4")
    return save_quantized(model, tmp_path / "base" / "nf4.safetensors")


def _codes_as_float(path: Path) -> None:
    tensors = {k: v.float() if k.endswith("weight_packed") else v for k, v in load_file(path).items()}
    save_file(tensors, path, metadata=layout_of_file(path).metadata)


def _bad_layout(path: Path) -> None:
    tensors = load_file(path)
    save_file(tensors, path, metadata={"format": "pt", "lorakit.quantized_layers": "{not json"})


QUANT_DAMAGES = [
    pytest.param(_truncated, "does not fit its header", id="truncated"),
    pytest.param(_oversized_header, "over the", id="oversized-header"),
    pytest.param(_terabyte_tensor, "the file holds 16", id="1TB-tensor"),
    pytest.param(_codes_as_float, r"weight_packed is torch.float32 in the file but torch.uint8", id="wrong-dtype"),
    pytest.param(_bad_layout, "quantization layout is not valid JSON", id="bad-layout"),
]


@pytest.mark.parametrize(("damage", "match"), QUANT_DAMAGES)
def test_damaged_quantized_bases_are_refused(quantized_file, refused, damage, match):
    damage(quantized_file)
    model = make_llama()
    load = lambda: load_quantized(model, quantized_file)  # noqa: E731
    refused(model, quantized_file.parent, load, ValueError, match, quantized_file.name)


def test_nan_in_a_quantized_base_is_refused(quantized_file, refused):
    tensors = load_file(quantized_file)
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], float("nan"))
    save_file(tensors, quantized_file, metadata=layout_of_file(quantized_file).metadata)
    model = make_llama()
    load = lambda: load_quantized(model, quantized_file)  # noqa: E731
    refused(model, quantized_file.parent, load, ValueError, "'model.norm.weight' holds NaN", quantized_file.name)


# -- checkpoints ----------------------------------------------------------------------------------
def _tiny_run(folder: Path) -> Path:
    model = make_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    settings = LoopSettings(lr=0.01, max_steps=2, batch_size=2, seed=0, progress=False, save_every=1)
    train_adapter(model, random_token_rows(4), Collator(0), settings, folder)
    checkpoint = latest_checkpoint(folder)
    assert checkpoint is not None
    return checkpoint


def _fresh_adapted():
    model = make_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return model


@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory) -> Path:
    return _tiny_run(tmp_path_factory.mktemp("run"))


def _state_damages(marker: Path) -> list[tuple[Callable[[Path], None], str]]:
    def pickle_payload(path: Path) -> None:
        torch.save({"step": 1, "history": [Payload(marker)]}, path)

    def nan_moments(path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        for entry in saved["optimizer"]["state"].values():
            entry["exp_avg"] = torch.full_like(entry["exp_avg"], float("nan"))
        torch.save(saved, path)

    def wrong_structure(path: Path) -> None:
        torch.save({"step": "one", "optimizer": []}, path)

    def malformed_optimizer(path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        saved["optimizer"]["state"] = [1, 2]
        torch.save(saved, path)

    return [
        (_truncated, "cannot be read as a trainer state"),
        (pickle_payload, "cannot be read as a trainer state"),
        (nan_moments, "exp_avg' holds NaN"),
        (wrong_structure, "is not a lorakit trainer state"),
        (malformed_optimizer, "the optimizer state is malformed"),
    ]


def test_damaged_checkpoints_are_refused_before_the_model_changes(checkpoint_template, refused, tmp_path):
    marker = tmp_path / "pwned"
    for damage, match in _state_damages(marker):
        folder = tmp_path / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(checkpoint_template, folder)
        damage(folder / "trainer_state.pt")
        model = _fresh_adapted()
        restore = lambda: Checkpointer(tmp_path).restore_trained(model, folder)  # noqa: B023, E731
        refused(model, folder, restore, ValueError, match, "trainer_state.pt")
    assert not marker.exists()


# -- YAML run configs -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("lora: {r: [1, 2\n", "not valid YAML"),
        ("r: eight\n", "option r must be an integer"),
        ("- a\n- b\n", "must hold a mapping"),
        ("target_modules: [" + ",".join(["q_proj"] * 300_000) + "]\n", "over the 1048576-byte limit"),
        (
            "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
            "target_modules: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
            "target_modules must be a list of names",
        ),
    ],
    ids=["malformed", "wrong-type", "not-a-mapping", "huge", "aliases"],
)
def test_damaged_yaml_configs_are_refused(tmp_path, text, match):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(RunError, match=match) as info:
        RunConfig.from_sources(path)
    assert "\n" not in str(info.value)
