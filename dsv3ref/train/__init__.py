"""Training: a small DeepSeek-V3 trained on a laptop, with the report's three training ideas.

- `loop`: the training loop (`TrainConfig`, `train`): next-token and MTP losses, AdamW with warmup
  and cosine decay, gradient clipping, the auxiliary-loss-free bias update after every step (or a
  classic auxiliary loss, or none), validation with load-balance measurements, checkpoints that
  `DeepseekV3.from_pretrained` reads, exact resumption;
- `checkpoint`: a step's folder written whole (model, AdamW moments, `train_state.json`) and read back
  only after it and the resumed run's settings are checked;
- `run_folder`: whether a run may write into its `--out-dir`, and its `metrics.jsonl`;
- `fp8`: FP8 training as in the report's section 3.3 (Fprop, Dgrad and Wgrad GEMMs with their tile
  orientations) as a `torch.autograd.Function`;
- `data`: the corpus every Python installation has (its standard library's source) and the byte
  tokenizer.

The model never imports this package; it imports the model.
"""

from dsv3ref.train.data import Corpus, decode, encode
from dsv3ref.train.fp8 import FP8LinearFunction, FP8TrainLinear, fp8_training_layers
from dsv3ref.train.loop import (
    TrainConfig,
    bias_speed,
    build_model,
    learning_rate,
    max_violation,
    mtp_weight,
    small_config,
    train,
)

__all__ = ["Corpus", "FP8LinearFunction", "FP8TrainLinear", "TrainConfig", "bias_speed", "build_model", "decode",
           "encode", "fp8_training_layers", "learning_rate", "max_violation", "mtp_weight", "small_config", "train"]
