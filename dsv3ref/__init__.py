"""dsv3ref: a readable, tested reference implementation of DeepSeek-V3 in PyTorch.

Axis names. Every einops pattern and shape comment in the package uses these letters, each with
one meaning everywhere:

| letter   | axis                                                                        |
|----------|-----------------------------------------------------------------------------|
| `b`      | batch rows                                                                  |
| `t`      | positions of the current chunk (the queries)                                |
| `s`      | key positions (the cache: indices 0 .. end-1)                               |
| `n`      | tokens flattened over (b t): the rows the router and the experts see        |
| `h`      | attention heads                                                             |
| `d`      | one head's width (dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim) |
| `r`      | the latent's rank, kv_lora_rank                                             |
| `p`      | rotary pairs (qk_rope_head_dim / 2)                                         |
| `c`      | the model's width, hidden_size                                              |
| `v`      | the vocabulary                                                              |
| `e`      | routed experts (within a group, when next to `g`)                           |
| `g`      | expert groups                                                               |
| `k`      | a token's top-k slot (its k-th chosen expert)                               |
| `m`, `f` | an FP8 GEMM's rows (tokens) and output features                             |
| `kb`, `fb` | 128-wide blocks along an FP8 GEMM's input (K) and output features; `i`, `o` the offset inside one |

DeepSeek's own inference code (inference/model.py) writes absorbed MLA with other letters: its `s`
is our `t` (queries), its `t` our `s` (keys), its `c` our `r` (the latent) and its `r` our `d` of the
rotary part. So its

    "bshd,hdc->bshc"  (W^UK into the query)    is our  "b t h d, h d r -> b t h r"
    "bshc,btc->bsht"  (latent scores)          is our  "b t h r, b s r -> b h t s"
    "bshr,btr->bsht"  (rotary scores)          is our  "b t h d, b s d -> b h t s"
    "bsht,btc->bshc"  (attention over latents) is our  "b h t s, b s r -> b t h r"
    "bshc,hdc->bshd"  (W^UV out of the latent) is our  "b t h r, h d r -> b t h d"

(dsv3ref keeps heads before query positions in scores, `b h t s`, as torch's attention does.)
How the model computes (attention implementation and order, experts, GEMMs, FP8 kernel) is one
vocabulary too: see `dsv3ref.impl`.
"""

from dsv3ref import planted_bugs, routing
from dsv3ref.cache import KVCache, kv_cache_bytes
from dsv3ref.checkpoint import CheckpointError, save_pretrained
from dsv3ref.config import ModelConfig, RopeScaling
from dsv3ref.generate import Generation, generate
from dsv3ref.impl import Implementation
from dsv3ref.model import DeepseekV3
from dsv3ref.oracle import Comparison, compare, trace, trace_hf, trace_modules
from dsv3ref.paged_cache import PagedKVCache
from dsv3ref.parallel.planner import MemoryPlan, plan
from dsv3ref.params import ParameterCount, count_parameters
from dsv3ref.tokenizer import StreamDecoder, Tokenizer

__all__ = [
    "CheckpointError",
    "Comparison",
    "DeepseekV3",
    "Generation",
    "Implementation",
    "KVCache",
    "PagedKVCache",
    "MemoryPlan",
    "ModelConfig",
    "ParameterCount",
    "RopeScaling",
    "StreamDecoder",
    "Tokenizer",
    "compare",
    "count_parameters",
    "generate",
    "kv_cache_bytes",
    "plan",
    "planted_bugs",
    "routing",
    "save_pretrained",
    "trace",
    "trace_hf",
    "trace_modules",
]
__version__ = "0.1.0"
