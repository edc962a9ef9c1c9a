"""lorakit: Low-Rank Adaptation for PyTorch and transformers models.

import lorakit
lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
...train...
lorakit.save_adapter(model, "out/")
"""

from .analysis import analyze_adapter, subspace_similarity  # the rest: lorakit.analysis
from .combine import combine
from .config import LoraConfig
from .estimation import estimate  # compare, Estimate and the report: lorakit.estimation
from .export import export_gguf, export_gguf_lora  # ExportError, GGUF_TYPES: lorakit.export
from .inject import (
    active_adapters,
    adapter_config,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from .io import AdapterFileError, load_adapter, read_adapter, save_adapter
from .mixed import adapter_rows
from .quant import QuantLinear, dequantize, load_quantized, quantize, save_quantized

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "LoraConfig",
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "adapter_rows",
    "add_adapter",
    "analyze_adapter",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "estimate",
    "export_gguf",
    "export_gguf_lora",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "subspace_similarity",
    "trainable_parameters",
    "unmerge",
    # lorakit.quant (QLoRA)
    "QuantLinear",
    "dequantize",
    "load_quantized",
    "quantize",
    "save_quantized",
]
