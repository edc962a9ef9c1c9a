"""Export to llama.cpp / Ollama: a merged model as one GGUF file (`export_gguf`), or one LoRA adapter alone
as llama.cpp's LoRA GGUF (`export_gguf_lora`), written with the `gguf` package (no llama.cpp build needed).

names.py maps transformers tensors to GGUF ones per architecture (llama), encoding.py the tensor types,
vocab.py the tokenizer, gguf_model.py and gguf_lora.py the two file layouts, files.py the atomic write.
"""

from .encoding import GGUF_TYPES
from .gguf_lora import export_gguf_lora
from .gguf_model import export_gguf
from .names import ARCHITECTURES, ExportError

__all__ = ["ARCHITECTURES", "GGUF_TYPES", "ExportError", "export_gguf", "export_gguf_lora"]
