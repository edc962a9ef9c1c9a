"""The training loop on a tiny model: only adapter parameters change, the data order is seeded, Ctrl-C
leaves a checkpoint from which a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lorakit
from lorakit.train.data import Collator
from lorakit.train.hf_callback import AdapterCheckpointCallback
from lorakit.train.loop import LoopSettings, latest_checkpoint, micro_batches, train_adapter
from support.files import interrupting_collator, random_token_rows


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, dropout=0.2, target_modules=["q_proj", "v_proj"]))
    return model


features = random_token_rows


SETTINGS = dict(lr=0.05, max_steps=6, batch_size=2, grad_accum=2, seed=3, progress=False, save_every=None)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorakit.io.adapter_state_dict(model).items()}


def test_micro_batches_cover_each_epoch_once_in_seeded_order():
    settings = LoopSettings(batch_size=4, grad_accum=1, epochs=2, seed=7)
    plan = micro_batches(10, settings, start_step=0)
    assert [len(b) for _, b in plan] == [4, 4, 2, 4, 4, 2]
    first, second = plan[:3], plan[3:]
    assert sorted(i for _, b in first for i in b) == list(range(10)) == sorted(i for _, b in second for i in b)
    assert [b for _, b in first] != [b for _, b in second]  # reshuffled per epoch
    assert micro_batches(10, settings, 0) == plan  # same seed, same order
    assert micro_batches(10, settings, start_step=4) == plan[4:]


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    lengths = torch.randint(5, 200, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = LoopSettings(batch_size=8, epochs=2, seed=3)
    grouped = micro_batches(600, settings, 0, lengths)
    plain = micro_batches(600, settings, 0)
    per_epoch = len(grouped) // 2
    for epoch in range(2):
        batches = [b for _, b in grouped[epoch * per_epoch : (epoch + 1) * per_epoch]]
        assert sorted(i for b in batches for i in b) == list(range(600))

    def padded_tokens(plan):  # every batch is padded to its longest example
        return sum(len(b) * max(lengths[i] for i in b) for _, b in plan)

    assert padded_tokens(grouped) < 0.75 * padded_tokens(plain)
    assert micro_batches(600, settings, 0, lengths) == grouped  # seeded
    assert micro_batches(600, settings, 10, lengths) == grouped[10:]  # a resume sees the same plan
    # Batch order is still random: the first batches are not simply the longest ones.
    first_maxima = [max(lengths[i] for i in b) for _, b in grouped[:8]]
    assert first_maxima != sorted(first_maxima, reverse=True)


def test_only_adapter_parameters_change(tmp_path):
    model = tiny_model()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_tensors(model)
    train_adapter(model, features(), Collator(0), LoopSettings(**SETTINGS), tmp_path)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    after = adapter_tensors(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("at_call", [6, 7])  # mid-way through a step's accumulation, and at a step boundary
def test_ctrl_c_checkpoint_then_resume_equals_uninterrupted(tmp_path, at_call):
    reference = tiny_model()
    train_adapter(reference, features(), Collator(0), LoopSettings(**SETTINGS), tmp_path / "ref")

    interrupted = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        collate = interrupting_collator(0, at_call)
        train_adapter(interrupted, features(), collate, LoopSettings(**SETTINGS), tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == f"step-{(at_call - 1) // 2:06d}"

    resumed = tiny_model()
    result = train_adapter(resumed, features(), Collator(0), LoopSettings(**SETTINGS), tmp_path / "run", resume=True)
    assert result.steps == 6
    expected, got = adapter_tensors(reference), adapter_tensors(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


def test_a_resumed_run_reports_the_training_time_of_both_parts(tmp_path):
    pause = 0.2  # seconds each micro-batch's collation sleeps: 12 micro-batches in the run's 6 steps

    def slow(collate):
        def collate_slowly(rows):
            time.sleep(pause)
            return collate(rows)

        return collate_slowly

    first_start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):  # at the 7th micro-batch: after step 3
        train_adapter(tiny_model(), features(), slow(interrupting_collator(0, 7)), LoopSettings(**SETTINGS), tmp_path)
    first_part = time.perf_counter() - first_start
    second_start = time.perf_counter()
    result = train_adapter(tiny_model(), features(), slow(Collator(0)), LoopSettings(**SETTINGS), tmp_path, resume=True)
    second_part = time.perf_counter() - second_start
    # The resumed part slept 6 × pause; the run as a whole 12 × pause, which only the two parts together reach.
    assert second_part < 12 * pause <= result.wall_time_s <= first_part + second_part


def test_trainer_callback_writes_loadable_adapter_per_checkpoint(tmp_path):
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        learning_rate=0.05,
        save_only_model=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=features(4),
        data_collator=Collator(0),
        callbacks=[AdapterCheckpointCallback(model)],
    )
    trainer.train()
    for folder in (tmp_path / "checkpoint-1" / "adapter", tmp_path / "checkpoint-2" / "adapter", tmp_path / "adapter"):
        assert (folder / "adapter_model.safetensors").is_file(), folder
    fresh = tiny_model(seed=1)
    lorakit.delete_adapter(fresh, "default")
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    for key, value in adapter_tensors(model).items():
        torch.testing.assert_close(adapter_tensors(fresh)[key], value)


class RecordingWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what the loop logs."""

    instances: list[RecordingWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        RecordingWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_gets_every_logged_scalar(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    result = train_adapter(
        tiny_model(),
        features(),
        Collator(0),
        LoopSettings(**SETTINGS, tensorboard=True),
        tmp_path,
        evaluate=lambda m: {"eval_loss": 1.5},
    )
    writer = RecordingWriter.instances[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    expected = [(k, v, h["step"]) for h in result.history for k, v in h.items() if k != "step"]
    assert writer.scalars == expected and ("eval_loss", 1.5, 6) in expected


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(ValueError, match="pip install tensorboard"):
        train_adapter(tiny_model(), features(), Collator(0), LoopSettings(**SETTINGS, tensorboard=True), tmp_path)
