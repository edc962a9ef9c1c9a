"""Fine-tuning methods behind one protocol (`FineTuningMethod`): LoRA, and the methods to compare it with —
full fine-tuning, BitFit, Houlsby adapters, prefix tuning, prompt tuning and linear probing. Each one is
applied to a model in place, trains only its own parameters (and a classification head), and saves them to
a folder: PEFT's adapter format for LoRA, a small method folder of its own for the others (see `files`).

    from lorakit.methods import MethodOptions, get_method, load_trained
    method = get_method("adapter")
    method.apply(model, MethodOptions(adapter_size=32))   # -> (trainable, total)
    ...train...
    method.save(model, "out/adapter")
    load_trained(fresh_base, "out/adapter")               # any saved folder; returns its method

The functions of earlier versions (`apply_method(model, name, options)`, `save_method`, `load_method`,
`restore_method`, `remove_method`, `disabled`, `method_name`) do the same through the registry.
"""

from .base import METHOD_OPTION_NAMES, MethodOptions, method_state
from .files import CONFIG_NAME, WEIGHTS_NAME, is_method_folder
from .protocol import FineTuningMethod
from .registry import (
    METHODS,
    apply_method,
    disabled,
    get_method,
    load_method,
    load_trained,
    method_name,
    method_of,
    read_method,
    remove_method,
    restore_method,
    save_method,
    saved_method,
)

__all__ = [
    "CONFIG_NAME",
    "METHODS",
    "WEIGHTS_NAME",
    "FineTuningMethod",
    "METHOD_OPTION_NAMES",
    "MethodOptions",
    "apply_method",
    "disabled",
    "get_method",
    "is_method_folder",
    "load_method",
    "load_trained",
    "method_name",
    "method_of",
    "method_state",
    "read_method",
    "remove_method",
    "restore_method",
    "save_method",
    "saved_method",
]
