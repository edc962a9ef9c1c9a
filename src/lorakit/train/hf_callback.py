"""Use lorakit inside transformers' `Trainer` (or TRL's `SFTTrainer`): a callback that writes the
adapter folder (PEFT layout, a few MB) into every checkpoint directory and at the end of training.

    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[AdapterCheckpointCallback(model)])
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..io import save_adapter


class AdapterCheckpointCallback(TrainerCallback):
    def __init__(
        self, model: nn.Module, adapter_name: str = "default", subfolder: str = "adapter", **adapter_meta: Any
    ) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.subfolder = subfolder
        self.adapter_meta = adapter_meta

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.subfolder)
            save_adapter(self.model, folder, self.adapter_name, **self.adapter_meta)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, self.subfolder)
            save_adapter(self.model, folder, self.adapter_name, **self.adapter_meta)
        return control
