"""`Parallel` without a process group: per-rank step seeds and when gradients are exchanged."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lorakit.train.distributed import LossOf, Parallel, step_seed, training_loss, unwrap
from lorakit.train.loss import fused_head
from support.models import make_llama


def draws(parallel: Parallel, step: int) -> torch.Tensor:
    torch.manual_seed(123)
    parallel.seed_step(seed=7, step=step)
    return torch.rand(4)


def test_each_rank_and_step_gets_its_own_stream_and_it_repeats():
    rank0, rank1 = Parallel("ddp", 0, 2), Parallel("ddp", 1, 2)
    assert not torch.equal(draws(rank0, 3), draws(rank1, 3))
    assert not torch.equal(draws(rank0, 3), draws(rank0, 4))
    assert torch.equal(draws(rank1, 3), draws(rank1, 3))
    assert len({step_seed(7, s, r) for s in range(50) for r in range(8)}) == 400
    assert all(0 <= step_seed(7, s, 0) < 2**63 for s in range(50))


def test_one_process_keeps_its_single_stream():
    torch.manual_seed(123)
    expected = torch.rand(4)
    assert torch.equal(draws(Parallel(), 3), expected)


class RecordingWrapper:
    """Stands in for DDP (no_sync) and FSDP2 (set_requires_gradient_sync), recording what was asked."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @contextmanager
    def no_sync(self):
        self.events.append("no_sync enter")
        yield
        self.events.append("no_sync exit")

    def set_requires_gradient_sync(self, flag: bool) -> None:
        self.events.append(f"sync={flag}")


def test_only_the_last_micro_batch_exchanges_gradients():
    for mode, skipped in (("ddp", ["no_sync enter", "no_sync exit"]), ("fsdp", ["sync=False", "sync=True"])):
        wrapper = RecordingWrapper()
        parallel = Parallel(mode, 0, 2)
        with parallel.gradient_sync(wrapper, sync=False):  # type: ignore[arg-type]
            wrapper.events.append("backward")
        assert wrapper.events == [skipped[0], "backward", skipped[1]]
        wrapper.events.clear()
        with parallel.gradient_sync(wrapper, sync=True):  # type: ignore[arg-type]
            wrapper.events.append("backward")
        assert wrapper.events == ["backward"]


def test_a_single_process_never_touches_the_wrapper():
    wrapper = RecordingWrapper()
    with Parallel().gradient_sync(wrapper, sync=False):  # type: ignore[arg-type]
        pass
    assert wrapper.events == []


def test_ddp_wraps_the_training_loss_fused_head_included():
    """What DDP wraps computes the loop's loss (the fused LM-head path) and equals the model's own loss."""
    torch.manual_seed(0)
    model = make_llama().double()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    wrapped = LossOf(model)
    assert fused_head(wrapped.module) is not None

    class FakeDDP(torch.nn.Module):  # DDP's shape: the wrapped module under `.module`, forward passed through
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, **batch):
            return self.module(**batch)

    fake = FakeDDP(wrapped)
    expected = model(**batch).loss.double()  # transformers computes it from float32 logits
    torch.testing.assert_close(training_loss(fake, batch), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(training_loss(model, batch), expected, rtol=1e-6, atol=0)
    assert unwrap(fake) is model and unwrap(model) is model
