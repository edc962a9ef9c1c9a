"""Adapter folders in PEFT's layout: round trips, what the file holds, atomic writes, and every kind of bad
folder refused with a clear AdapterFileError while the model stays exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterFileError, LoraConfig
from lorakit import io as lorakit_io
from support.models import make_bert, make_llama, randomize_lora, randomize_trainable

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _save(model, folder, config: LoraConfig, name: str = "default"):
    """Adapt `model` with `config`, randomise its trainable tensors, save; returns the adapted model."""
    lorakit.add_adapter(model, config, name)
    randomize_trainable(model)
    lorakit.save_adapter(model, folder, name)
    return model


@pytest.fixture
def saved(llama, tmp_path):
    """A llama adapter on q_proj, v_proj and embed_tokens, saved to tmp_path / "adapter"."""
    folder = tmp_path / "adapter"
    _save(llama, folder, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    return folder, llama


def _edit_config(folder, **changes) -> None:
    path = folder / CONFIG
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_gives_identical_outputs(saved, base_copy, input_ids):
    folder, trained = saved
    model = base_copy("llama")
    lorakit.load_adapter(model, folder)
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)
    assert lorakit.adapter_config(model, "default") == lorakit.adapter_config(trained, "default")
    assert lorakit.active_adapters(model) == ["default"]


def test_contents_read_by_the_caller_load_like_the_folder(saved, base_copy, input_ids):
    folder, trained = saved
    adapter = lorakit_io.read_adapter_contents(
        (folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes(), where="uploaded"
    )
    model = base_copy("llama")
    lorakit.load_adapter(model, adapter, name="uploaded")
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)
    assert lorakit.adapter_config(model, "uploaded") == lorakit.adapter_config(trained, "default")


def test_round_trip_with_bias_and_rank_patterns(llama_bias, base_copy, input_ids, tmp_path):
    config = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj"],
        bias="lora_only",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 3},
        use_rslora=True,
    )
    trained = _save(llama_bias, tmp_path, config)
    model = base_copy("llama_bias")
    lorakit.load_adapter(model, tmp_path)
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)


def test_round_trip_with_modules_to_save_and_bias_all(bert, base_copy, input_ids, tmp_path):
    config = LoraConfig(r=2, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])
    trained = _save(bert, tmp_path, config)
    model = base_copy("bert")
    lorakit.load_adapter(model, tmp_path)
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)


def test_round_trip_of_gpt2_and_conv_models(gpt2, convnet, base_copy, input_ids, images, tmp_path):
    trained = _save(gpt2, tmp_path / "g", LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    model = base_copy("gpt2")
    lorakit.load_adapter(model, tmp_path / "g")
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)

    trained = _save(convnet, tmp_path / "c", LoraConfig(r=2, target_modules=["conv1", "conv2", "head"]))
    model = base_copy("convnet")
    lorakit.load_adapter(model, tmp_path / "c")
    assert torch.equal(model(images), trained(images))


def test_load_as_a_second_named_adapter(saved, base_copy, input_ids):
    folder, trained = saved
    model = base_copy("llama")
    lorakit.add_adapter(model, LoraConfig(r=3, target_modules=["q_proj", "k_proj"]), "first")
    randomize_lora(model)
    lorakit.load_adapter(model, folder, name="loaded", activate=False)
    assert lorakit.adapter_names(model) == ["first", "loaded"]
    assert lorakit.active_adapters(model) == ["first"]
    lorakit.set_adapter(model, "loaded")
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)


def test_only_the_named_adapter_is_saved(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=3, target_modules=["v_proj"]), "b")
    lorakit.save_adapter(llama, tmp_path, "a")
    keys = set(load_file(tmp_path / WEIGHTS))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{m}.weight" for i in (0, 1) for m in "AB"}


# -- what is written ------------------------------------------------------------------------------
def test_the_file_holds_only_adapter_tensors_under_peft_keys(saved):
    folder, trained = saved
    tensors = load_file(folder / WEIGHTS)
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{m}.weight"
        for i in (0, 1)
        for p in ("q_proj", "v_proj")
        for m in "AB"
    }
    expected |= {f"base_model.model.model.embed_tokens.lora_embedding_{m}" for m in "AB"}
    assert set(tensors) == expected
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (8, 2)
    lora_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    model_bytes = sum(p.numel() * p.element_size() for p in trained.parameters())
    size = (folder / WEIGHTS).stat().st_size
    assert size < lora_bytes + 4096  # tensors plus a small header, nothing else
    assert size < model_bytes / 4
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG, WEIGHTS]


def test_config_file_is_peft_json_with_extras(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, alpha=5, target_modules=["q_proj"]))
    lorakit.save_adapter(llama, tmp_path, base_model_name_or_path="tiny-llama", task_type="CAUSAL_LM")
    data = json.loads((tmp_path / CONFIG).read_text())
    assert (data["peft_type"], data["r"], data["lora_alpha"]) == ("LORA", 2, 5)
    assert (data["base_model_name_or_path"], data["task_type"]) == ("tiny-llama", "CAUSAL_LM")


def test_saving_again_replaces_the_files_and_leaves_no_temporaries(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(llama, tmp_path)
    randomize_lora(llama)
    lorakit.save_adapter(llama, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    saved_b = load_file(tmp_path / WEIGHTS)["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(saved_b, llama.model.layers[0].self_attn.q_proj.lora_B["default"].weight)


def test_a_failed_weight_write_keeps_the_previous_files(llama, tmp_path, monkeypatch):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(llama, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lorakit_io, "save_file", half_written)
    randomize_lora(llama)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_adapter(llama, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_config_that_cannot_be_written_touches_no_file(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(llama, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize_lora(llama)
    with pytest.raises(TypeError):
        lorakit.save_adapter(llama, tmp_path, base_model_name_or_path=object())  # not JSON-serialisable
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_saving_an_unknown_adapter_writes_nothing(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(KeyError, match="nope"):
        lorakit.save_adapter(llama, tmp_path / "out", "nope")
    assert not (tmp_path / "out").exists()


# -- legacy and foreign files ---------------------------------------------------------------------
def test_legacy_adapter_model_bin_loads(saved, base_copy, input_ids):
    folder, trained = saved
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    model = base_copy("llama")
    lorakit.load_adapter(model, folder)
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)


def test_unknown_config_fields_are_ignored_with_a_warning(saved, base_copy, input_ids):
    folder, trained = saved
    _edit_config(folder, option_from_the_future=True)
    model = base_copy("llama")
    with pytest.warns(UserWarning, match="option_from_the_future"):
        lorakit.load_adapter(model, folder)
    assert torch.equal(model(input_ids).logits, trained(input_ids).logits)


# -- bad folders ----------------------------------------------------------------------------------
def _corrupt_truncated(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_garbage(folder):
    (folder / WEIGHTS).write_bytes(b"\x00\x01 this is not a safetensors file" * 10)


def _corrupt_empty(folder):
    (folder / WEIGHTS).write_bytes(b"")


def _corrupt_pickle(folder):
    torch.save(load_file(folder / WEIGHTS), folder / WEIGHTS)  # a torch pickle under the safetensors name


def _corrupt_no_tensors(folder):
    save_file({}, folder / WEIGHTS)


def _corrupt_no_weights(folder):
    (folder / WEIGHTS).unlink()


def _corrupt_no_config(folder):
    (folder / CONFIG).unlink()


def _corrupt_config_truncated(folder):
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(text[: len(text) // 2])


def _corrupt_config_not_an_object(folder):
    (folder / CONFIG).write_text("[1, 2, 3]")


def _corrupt_bin_garbage(folder):
    (folder / WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"not a pickle")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_corrupt_truncated, "does not fit its header: the tensors need .* bytes of data, the file holds"),
        (_corrupt_garbage, "safetensors header of .* bytes, over the .* limit"),
        (_corrupt_empty, "is not a safetensors file: 0 bytes"),
        (_corrupt_pickle, "safetensors header of .* bytes, over the .* limit"),
        (_corrupt_no_tensors, "holds no tensors"),
        (_corrupt_no_weights, f"has no {WEIGHTS}"),
        (_corrupt_no_config, f"has no {CONFIG}"),
        (_corrupt_config_truncated, "not valid JSON"),
        (_corrupt_config_not_an_object, "must hold a JSON object"),
        (_corrupt_bin_garbage, "adapter_model.bin cannot be read"),
    ],
)
def test_unreadable_folders_are_refused(saved, base_copy, unchanged, corrupt, message):
    folder, _ = saved
    corrupt(folder)
    model = base_copy("llama")
    with unchanged(model), pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, folder)


def test_missing_folder_is_refused(llama, unchanged, tmp_path):
    with unchanged(llama), pytest.raises(AdapterFileError, match="no adapter folder"):
        lorakit.load_adapter(llama, tmp_path / "nowhere")


def test_adapter_error_is_a_value_error():
    assert issubclass(AdapterFileError, ValueError)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"peft_type": "IA3"}, "IA3"),
        ({"r": 0}, "r must be a positive integer"),
    ],
)
def test_unsupported_or_invalid_configs_are_refused(saved, base_copy, unchanged, changes, message):
    folder, _ = saved
    _edit_config(folder, **changes)
    model = base_copy("llama")
    with unchanged(model), pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, folder)


# -- adapters that do not fit ---------------------------------------------------------------------
def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path, base_copy, unchanged):
    _save(make_llama(hidden=24), tmp_path, LoraConfig(r=2, target_modules=["q_proj"]))
    model = base_copy("llama")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "existing")  # failure must not touch it
    with unchanged(model), pytest.raises(AdapterFileError) as error:
        lorakit.load_adapter(model, tmp_path, name="other")
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj.lora_A" in message
    assert "(2, 24)" in message and "(2, 16)" in message


def test_rank_in_the_config_disagreeing_with_the_file_is_refused(saved, base_copy, unchanged):
    folder, _ = saved
    _edit_config(folder, r=4)
    model = base_copy("llama")
    message = r"embed_tokens.lora_embedding_A: shape \(2, 64\) in the file, but this model needs \(4, 64\)"
    with unchanged(model), pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, folder)


def test_adapter_for_another_architecture_is_refused(saved, gpt2, unchanged):
    folder, _ = saved
    with unchanged(gpt2), pytest.raises(AdapterFileError, match=r"does not fit.*model\.embed_tokens.*do not exist"):
        lorakit.load_adapter(gpt2, folder)


def _rewrite_weights(folder, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def test_target_of_an_unsupported_type_is_refused(saved, base_copy, unchanged):
    folder, _ = saved

    def retarget(tensors):
        for m in "AB":
            key = f"base_model.model.model.layers.0.self_attn.q_proj.lora_{m}.weight"
            tensors[key.replace("self_attn.q_proj", "mlp")] = tensors.pop(key)

    _rewrite_weights(folder, retarget)
    model = base_copy("llama")
    with unchanged(model), pytest.raises(AdapterFileError, match="model.layers.0.mlp' is a LlamaMLP"):
        lorakit.load_adapter(model, folder)


def test_half_an_adapter_is_refused(saved, base_copy, unchanged):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    model = base_copy("llama")
    message = r"layers\.1\.self_attn\.v_proj: the file has \['lora_A'\].*needs \['lora_A', 'lora_B'\]"
    with unchanged(model), pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(model, folder)


def test_unexpected_tensor_is_refused(saved, base_copy, unchanged):
    folder, _ = saved
    _rewrite_weights(folder, lambda t: t.update({"base_model.model.model.norm.weight": torch.ones(16)}))
    model = base_copy("llama")
    with unchanged(model), pytest.raises(AdapterFileError, match="unexpected tensor 'model.norm.weight'"):
        lorakit.load_adapter(model, folder)


def test_trained_bias_the_model_lacks_is_refused(llama_bias, llama, tmp_path, unchanged):
    _save(llama_bias, tmp_path, LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    with unchanged(llama), pytest.raises(AdapterFileError, match="q_proj.*bias.*which this model does not have"):
        lorakit.load_adapter(llama, tmp_path)


def test_saved_module_of_another_shape_is_refused(bert, tmp_path, unchanged):
    _save(make_bert(num_labels=5), tmp_path, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    message = r"classifier\.(weight|bias): shape \(5,( 16)?\) in the file, \(3,( 16)?\) in the model"
    with unchanged(bert), pytest.raises(AdapterFileError, match=message):
        lorakit.load_adapter(bert, tmp_path)


def test_duplicate_name_on_load_is_refused(saved, base_copy, unchanged):
    folder, _ = saved
    model = base_copy("llama")
    lorakit.load_adapter(model, folder)
    with unchanged(model), pytest.raises(ValueError, match="'default' already exists"):
        lorakit.load_adapter(model, folder)


def test_loading_into_a_merged_model_is_refused(saved, base_copy, unchanged):
    folder, _ = saved
    model = base_copy("llama")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.merge(model)
    with unchanged(model), pytest.raises(RuntimeError, match="merged"):
        lorakit.load_adapter(model, folder, name="b")
