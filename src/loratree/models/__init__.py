"""Base models: load one (HF directory, GGUF file, embedded SmolLM2), save one, or build a
tiny random one for tests."""

from loratree.models.embedded import (
    EMBEDDED_NAME,
    cache_root,
    embedded_gguf_path,
    embedded_model_dir,
    load_gguf,
)
from loratree.models.load import EMBEDDED_ALIASES, ModelNotFoundError, load_base, load_hf_dir
from loratree.models.quantized import is_quantized_dir, load_quantized, save_quantized
from loratree.models.save import save_model
from loratree.models.tiny import (
    TinyConvNet,
    random_tokens,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

__all__ = [
    "EMBEDDED_ALIASES",
    "EMBEDDED_NAME",
    "ModelNotFoundError",
    "TinyConvNet",
    "cache_root",
    "embedded_gguf_path",
    "embedded_model_dir",
    "is_quantized_dir",
    "load_base",
    "load_gguf",
    "load_hf_dir",
    "load_quantized",
    "random_tokens",
    "save_model",
    "save_quantized",
    "tiny_convnet",
    "tiny_gpt2",
    "tiny_llama",
]
