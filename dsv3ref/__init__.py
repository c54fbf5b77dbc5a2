"""dsv3ref: a readable, tested reference implementation of DeepSeek-V3 in PyTorch."""

from dsv3ref import routing
from dsv3ref.cache import KVCache, kv_cache_bytes
from dsv3ref.checkpoint import CheckpointError, save_pretrained
from dsv3ref.config import ModelConfig, RopeScaling
from dsv3ref.generate import Generation, generate
from dsv3ref.model import DeepseekV3
from dsv3ref.oracle import Comparison, compare, trace, trace_hf, trace_modules
from dsv3ref.params import ParameterCount, count_parameters
from dsv3ref.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "CheckpointError",
    "Comparison",
    "DeepseekV3",
    "Generation",
    "KVCache",
    "ModelConfig",
    "ParameterCount",
    "RopeScaling",
    "StreamDecoder",
    "Tokenizer",
    "compare",
    "count_parameters",
    "generate",
    "kv_cache_bytes",
    "routing",
    "save_pretrained",
    "trace",
    "trace_hf",
    "trace_modules",
]
__version__ = "0.1.0"
