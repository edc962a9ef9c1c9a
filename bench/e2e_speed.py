"""End to end on the E2E sample, part 2 of bench/train_step.py: non-padding tokens per second over a fixed number
of optimizer steps of 8 examples, data preparation included, for three set-ups, each in its own process:

- lorakit: `lorakit.train`'s loop with every default (fused paths, length-grouped batches, loss on target tokens);
- floor: the frozen model on lorakit's own batches (same encoding and batch plan): its forward with lorakit's loss
  and the input-gradient half of the backward, nothing trained: the most tokens per second any LoRA run of these
  batches can reach at this precision;
- peft+trainer: PEFT + transformers `Trainer` with the seeds' recipe (each example tokenized alone with
  `padding=True`, `DataCollatorForLanguageModeling(mlm=False)`: loss on every token).

lorakit's and the floor's processes keep freed host memory for reuse, as lorakit's loop does; PEFT's runs on
glibc's defaults. Tokens are counted in the batches trained on (for `Trainer`, at the model's forward: its data
loader collates one batch ahead). Both adapters are then scored with the same held-out loss (target tokens of 64
validation examples) to check that the speed did not cost quality.
"""

from __future__ import annotations

import tempfile
import time

import torch
from setups import MODEL, TARGETS, floor_loss

from lorakit.host_memory import keep_freed_host_memory
from lorakit.train.fast_paths import enable_training_fast_paths


def e2e_data(steps: int):
    """The first 16 examples per step of the shipped E2E sample (twice what `steps` steps of 8 take), and the
    first 64 validation examples."""
    from lorakit.train.data import load_data

    train = load_data("e2e", "train", "causal-lm").examples[: steps * 8 * 2]
    val = load_data("e2e", "validation", "causal-lm").examples[:64]
    return train, val


def encoded(tokenizer, examples) -> list[dict]:
    """The examples as lorakit's loop and held-out loss take them (at most 256 tokens)."""
    from lorakit.train.data import encode_causal

    return [encode_causal(tokenizer, ex, 256) for ex in examples]


def loop_settings(steps: int):
    """lorakit's loop settings for `steps` steps of 8: the floor takes the same batch plan from them."""
    from lorakit.train.loop import LoopSettings

    return LoopSettings(lr=1e-3, batch_size=8, max_steps=steps, save_every=None, progress=False)


def _heldout_loss(model, tokenizer, val) -> float:
    from lorakit.train.data import Collator
    from lorakit.train.evaluate import mean_loss

    return mean_loss(model, encoded(tokenizer, val), Collator(tokenizer.pad_token_id))


def _counting(collate, tokens: list[int]):
    """`collate` that adds each batch's non-padding tokens to tokens[0]."""

    def wrapped(features):
        batch = collate(features)
        tokens[0] += int(batch["attention_mask"].sum())
        return batch

    return wrapped


def _e2e_lorakit(model, tokenizer, train, steps: int, tokens: list[int]) -> float:
    """lorakit's training loop with every default; its final training loss."""
    import lorakit
    from lorakit.train.data import Collator
    from lorakit.train.loop import train_adapter

    features = encoded(tokenizer, train)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=TARGETS))
    collate = _counting(Collator(tokenizer.pad_token_id), tokens)
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(model, features, collate, loop_settings(steps), out)
    return result.final_loss


def _e2e_floor(model, tokenizer, train, steps: int, tokens: list[int]) -> float:
    """The floor on lorakit's own batches (same encoding, same length-grouped plan): the frozen model's forward
    with lorakit's loss and the input-gradient half of its backward; its last loss."""
    from lorakit.train.batches import by_step, feature_batches
    from lorakit.train.data import Collator

    keep_freed_host_memory()  # as lorakit's loop does
    features = encoded(tokenizer, train)
    model.requires_grad_(False)
    enable_training_fast_paths(model)
    collate = _counting(Collator(tokenizer.pad_token_id), tokens)
    loss = torch.tensor(float("nan"))
    for _, batches in by_step(feature_batches(features, loop_settings(steps), 0)):
        for indices in batches:
            loss = floor_loss(model, collate([features[i] for i in indices]))
            loss.backward()
    return loss.item()


def _e2e_peft(model, tokenizer, train, steps: int, tokens: list[int]) -> float:
    """PEFT + transformers `Trainer` with the seeds' recipe; its final logged training loss."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from lorakit.train.data import format_prompt

    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    texts = [format_prompt(tokenizer, ex.prompt) + ex.target + tokenizer.eos_token for ex in train]
    data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], padding=True, truncation=True, max_length=256, add_special_tokens=False),
        remove_columns=["text"],
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    # Counted where the model takes a batch: accelerate's data loader collates one batch ahead of training.
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: tokens.__setitem__(0, tokens[0] + int(kwargs["attention_mask"].sum())),
        with_kwargs=True,
    )
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=8,
            max_steps=steps,
            learning_rate=1e-3,
            warmup_steps=max(1, int(0.05 * steps)),
            lr_scheduler_type="linear",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        history = trainer.train() and trainer.state.log_history
    hook.remove()
    return [h["loss"] for h in history if "loss" in h][-1]


E2E_SETUPS = {"floor": _e2e_floor, "lorakit": _e2e_lorakit, "peft+trainer": _e2e_peft}


def e2e_child(setup: str, steps: int) -> dict:
    """In a fresh process: `setup` (a key of E2E_SETUPS) over `steps` steps of the E2E sample, timed from the
    loaded model (data preparation included), then its adapter's held-out loss (not for the floor)."""
    from lorakit.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(MODEL, "causal-lm")
    tokens = [0]
    begin = time.perf_counter()
    train, val = e2e_data(steps)
    final_loss = E2E_SETUPS[setup](model, tokenizer, train, steps, tokens)
    wall = time.perf_counter() - begin
    return {
        "setup": setup,
        "steps": steps,
        "wall_s": wall,
        "tokens": tokens[0],
        "tokens_per_s": tokens[0] / wall,
        "final_train_loss": final_loss,
        "heldout_target_loss": None if setup == "floor" else _heldout_loss(model, tokenizer, val),
    }


def e2e_table(e2e: dict) -> list[str]:
    """The end-to-end rows: tokens/s, and time per token against the floor's (results saved before the floor
    row have none)."""
    lines = [
        "| E2E end to end | tokens/s | ×floor | wall | final train loss | held-out target loss |",
        "|---|---|---|---|---|---|",
    ]
    for setup in [s for s in E2E_SETUPS if s in e2e]:
        r = e2e[setup]
        floor = f"{e2e['floor']['tokens_per_s'] / r['tokens_per_s']:.2f}" if "floor" in e2e else "–"
        heldout = "–" if r["heldout_target_loss"] is None else f"{r['heldout_target_loss']:.3f}"
        lines.append(
            f"| {setup} | {r['tokens_per_s']:.0f} | {floor} | {r['wall_s']:.0f} s | {r['final_train_loss']:.3f} | "
            f"{heldout} |"
        )
    ratio = e2e["lorakit"]["tokens_per_s"] / e2e["peft+trainer"]["tokens_per_s"]
    lines.append(f"| lorakit ÷ peft+trainer | {ratio:.2f}× | | | | |")
    if "floor" in e2e:
        ceiling = e2e["floor"]["tokens_per_s"] / e2e["peft+trainer"]["tokens_per_s"]
        lines.append(f"| floor ÷ peft+trainer | {ceiling:.2f}× | | | | |")
    return lines
