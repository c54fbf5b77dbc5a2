"""A training step, side by side: dsv3ref against HF transformers on the same work, the MTP objective's
extra time against its share of the work, and the FP8 step against the float32 one.

    python benchmarks/train_step.py                       # the training loop's model, 16 x 128 bytes
    python benchmarks/train_step.py --preset small --batch 4 --seq 128
    python benchmarks/train_step.py --device cuda        # on a GPU

Contenders (same weights, same batch, float32, AdamW with foreach=False as the loop uses, one step =
zero_grad + forward + backward + optimizer step):

- "HF main loss": transformers' DeepseekV3ForCausalLM(ids, labels=ids), its own loss;
- "dsv3ref main loss": cross-entropy of dsv3ref's logits over the same shifted targets (the training
  loop's model: moe_impl "loop", each expert its own three linear layers);
- "dsv3ref main, grouped": the same with moe_impl "grouped" (stacked experts, one grouped GEMM per
  projection: the layout HF's experts have, and HF's default grouped_mm computation);
- "dsv3ref main, absorb": the training loop's model with attn_impl "absorb" (`--attn-impl absorb` of
  `dsv3ref train`): a training chunk has as many queries as keys, so it takes the expanded order,
  torch's fused attention kernel forward and backward, told the mask is causal (HF's sdpa runs its
  math fallback here: MLA's values are narrower than its keys);
- "dsv3ref main, absorb + grouped": both choices (`--attn-impl absorb --moe-impl grouped`);
- "dsv3ref main + MTP": `model.loss(ids)`, what the training loop runs (the MTP module adds one block
  and one more pass through the shared head per depth);
- "dsv3ref FP8 main + MTP": the same with every FP8-eligible layer trained through the exact FP8
  emulation (dsv3ref.train.fp8, fp8_kernel "emulate");
- "dsv3ref FP8 main + MTP, dequantize": the same FP8 training with fp8_kernel "dequantize" (the same
  E4M3 operands and scales, each GEMM one float32 product of the dequantized operands);
- "float64 GEMMs main + MTP": the FP8 step's floor on this hardware: the same layers run their three
  GEMMs (forward, Dgrad, Wgrad) as single float64 products, as the exact emulation must (a 128-term sum
  of E4M3 products needs float64 to be exact), with no quantization and no per-block split.

Each round runs every contender for --steps consecutive steps, as a training loop runs its model, and
counts all but the first (the first after another contender's step pays for the memory that step left
behind: freed and fresh pages), the order rotating by one a round (A B C D, B C D A, ...: no contender
always follows the same one); one warm-up step each before the first round. Medians of the counted
steps are reported with the range. Ratios above 1 mean dsv3ref is faster than its peer. The MTP's
share of the work is counted as multiply-adds (dsv3ref.params: forward multiply-adds of the main model
and of the MTP module per token); its time share is (main + MTP - main) / main.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from common import machine

import dsv3ref
from dsv3ref.argtypes import integer
from dsv3ref.fp8 import replace_fp8_layers
from dsv3ref.train.fp8 import fp8_training_layers
from dsv3ref.train.loop import small_config


class Float64Linear(torch.nn.Linear):
    """nn.Linear whose products run in float64 (forward, and through autograd both backward GEMMs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.double(), self.weight.double()).to(x.dtype)


def float64_layers(layer: torch.nn.Linear) -> Float64Linear:
    out = Float64Linear(layer.in_features, layer.out_features, bias=False)
    out.weight = layer.weight
    return out


VARIANTS = {"grouped": dict(moe_impl="grouped"), "absorb": dict(attn_impl="absorb"),
            "absorb + grouped": dict(attn_impl="absorb", moe_impl="grouped")}
"""The training loop's model with other implementation choices (dsv3ref.impl), the same weights."""


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=False)


def dsv3ref_main(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def dsv3ref_full(model, ids):
    return model.loss(ids)["loss"]


def hf_main(model, ids):
    return model(ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss


def step(model, optimizer, loss_fn, ids) -> float:
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)  # a GPU's queued work, waited for
    sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model, ids).backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start


def mtp_share(cfg: dsv3ref.ModelConfig, seq: int) -> float:
    """The MTP objective's multiply-adds over the main model's, per step: the MTP module's active
    weights (its layer with top-k of its experts, eh_proj) plus one more pass through the shared head,
    over seq - D positions per depth, against the main model's active weights (no embedding lookup)
    over seq positions. Attention scores are left out of both (a few percent at these lengths)."""
    count = dsv3ref.count_parameters(cfg)
    idle = (cfg.n_routed_experts - cfg.num_experts_per_tok) * count.routed_expert
    depth = cfg.num_nextn_predict_layers
    mtp = (count.mtp / depth - idle + count.head) * (seq - depth) * depth
    return mtp / ((count.activated - count.embedding) * seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="train", help="'train' (the training loop's model) or a ModelConfig "
                                                          "preset ('tiny', 'small')")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--steps", type=integer(1), default=3,
                        help="consecutive steps of a contender per round, the first not counted (with 1, it is)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which of VARIANTS to time (default: all; none with the flag alone; each is one more "
                             "model in memory: `small` holds about 5 GB a model with its optimizer)")
    parser.add_argument("--device", default="cpu", help="where every contender runs ('cuda': a GPU, float32 "
                                                        "GEMMs without TF32, torch's default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = small_config() if args.preset == "train" else dsv3ref.ModelConfig.preset(args.preset).replace(
        num_nextn_predict_layers=1, quantization_config=None)
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report lists the MTP tensors it does not model
    print(f"machine: {machine(args.device)}")
    print(f"config: {args.preset}; hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, experts "
          f"{cfg.n_routed_experts} (top-{cfg.num_experts_per_tok}), MTP depth {cfg.num_nextn_predict_layers}; "
          f"batch {args.batch} x {args.seq + 1} tokens, float32 on {args.device}")
    torch.manual_seed(0)
    model = dsv3ref.DeepseekV3(cfg).train()
    with tempfile.TemporaryDirectory() as folder:
        dsv3ref.save_pretrained(model, folder)
        hf = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        variants = {f"dsv3ref main, {name}": dsv3ref.DeepseekV3.from_pretrained(
            folder, dtype=torch.float32, mmap=False, **VARIANTS[name]).train() for name in args.variants}
    contenders = {"HF main loss": (hf, hf_main), "dsv3ref main loss": (model, dsv3ref_main)}
    contenders.update({name: (m, dsv3ref_main) for name, m in variants.items()})
    contenders["dsv3ref main + MTP"] = (model, dsv3ref_full)
    if not args.no_fp8:
        torch.manual_seed(0)
        fp8 = dsv3ref.DeepseekV3(cfg).train()
        fp8.load_state_dict(model.state_dict())
        fp8_training_layers(fp8)
        contenders["dsv3ref FP8 main + MTP"] = (fp8, dsv3ref_full)
        fast = dsv3ref.DeepseekV3(cfg).train()
        fast.load_state_dict(model.state_dict())
        fp8_training_layers(fast, kernel="dequantize")
        contenders["dsv3ref FP8 main + MTP, dequantize"] = (fast, dsv3ref_full)
        floor = dsv3ref.DeepseekV3(cfg).train()
        floor.load_state_dict(model.state_dict())
        replace_fp8_layers(floor, float64_layers)
        contenders["float64 GEMMs main + MTP"] = (floor, dsv3ref_full)
    for m, _ in contenders.values():
        m.to(args.device)
    optimizers = {name: adamw(m) for name, (m, _) in contenders.items()}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    for name, (m, fn) in contenders.items():  # warm-up
        step(m, optimizers[name], fn, ids)
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(args.repeats):  # each round starts one contender later, so that none always follows the same
        for name in names[r % len(names):] + names[:r % len(names)]:
            m, fn = contenders[name]
            steps = [step(m, optimizers[name], fn, ids) for _ in range(args.steps)]
            times[name] += steps[1:] if len(steps) > 1 else steps
    med = {name: statistics.median(t) for name, t in times.items()}
    share = mtp_share(cfg, args.seq + 1)
    for name, t in times.items():
        ratio = ""
        if name == "dsv3ref main loss" or name in variants:
            ratio = f"{med['HF main loss'] / med[name]:.2f}x HF's speed on the same work"
        elif name == "dsv3ref main + MTP":
            extra = med[name] / med["dsv3ref main loss"] - 1
            ratio = f"MTP adds {extra:+.0%} time for {share:.0%} more work ({extra / share:.2f}x its share)"
        elif name.endswith("dequantize"):
            ratio = f"{med[name] / med['dsv3ref main + MTP']:.2f}x the float32 step's time"
        elif name.startswith("dsv3ref FP8"):
            ratio = (f"{med[name] / med['dsv3ref main + MTP']:.2f}x the float32 step's time, "
                     f"{med[name] / med['float64 GEMMs main + MTP']:.2f}x its floor")
        elif name.startswith("float64"):
            ratio = f"{med[name] / med['dsv3ref main + MTP']:.2f}x the float32 step's time"
        print(f"{name:36s} median {med[name] * 1e3:8.1f} ms (min {min(t) * 1e3:7.1f}, max {max(t) * 1e3:7.1f})  "
              f"{ratio}", flush=True)


if __name__ == "__main__":
    main()
