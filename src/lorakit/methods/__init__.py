"""Fine-tuning methods besides LoRA, to compare with it: full fine-tuning, BitFit, Houlsby adapters, prefix
tuning, prompt tuning and linear probing. Each one is applied to a model in place, trains only its own
parameters, and saves them to a small folder of its own (see `files`); `lora` stays lorakit's own path.

    from lorakit.methods import MethodOptions, apply_method, save_method, load_method
    apply_method(model, "adapter", MethodOptions(adapter_size=32))   # -> (trainable, total)
    ...train...
    save_method(model, "out/adapter")
    load_method(fresh_base, "out/adapter")
"""

from .base import MethodOptions, method_state
from .files import CONFIG_NAME, WEIGHTS_NAME, is_method_folder, load_method, read_method, restore_method, save_method
from .registry import METHODS, apply_method, disabled, method_name, remove_method

__all__ = [
    "CONFIG_NAME", "METHODS", "MethodOptions", "WEIGHTS_NAME", "apply_method", "disabled", "is_method_folder",
    "load_method", "method_name", "method_state", "read_method", "remove_method", "restore_method", "save_method",
]
