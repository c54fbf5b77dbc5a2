"""The model cut into pipeline stages, run by torch.distributed.pipelining's schedules.

Stage s of S holds a contiguous run of decoder layers (`layout.split_layers`); the first also holds
the embedding, the last the final norm, the output head and the MTP modules. The MTP module sits
beside the head because it needs the main model's last hidden state and shares the head and the
embedding (report section 2.2): in a V-shaped schedule (`zbv`, `dualpipev`) the first and the last
stage are on the same rank, so the embedding is one tensor, as the report arranges it ("the shallowest
layers, including the embedding, and the deepest layers, including the output head, on the same PP
rank"). In a straight pipeline the last rank holds a copy, whose gradient is summed with the first
rank's (the `tied` group of dsv3ref.train.distributed.layout).

A stage's forward takes the previous stage's hidden states (the first stage: the token ids) and the
micro-batch's token ids as a keyword argument, which every stage receives from the schedule: each
stage recomputes its rotary angles and causal mask from them, and the last stage reads the MTP
modules' input tokens from them. The last stage returns the logits of the main head and of each MTP
depth; `objective` turns them into the training loss of eqs. 24-25.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from dsv3ref.model import DeepseekV3
from dsv3ref.mtp import mtp_chain
from dsv3ref.train.distributed.layout import Layout

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": ScheduleInterleaved1F1B, "zb1p": ScheduleInterleavedZeroBubble,
                    "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
"""1F1B and ZB1P (the report's Table 2 rows) are torch's interleaved schedules with one stage per rank:
they run from their action list (`pipeline_order`), the list dsv3ref.train.distributed.timeline plays
out. (torch's Schedule1F1B runs a loop of its own beside a list drawn for display, whose last rank's
forwards are numbered 1..M instead of 0..M-1 in torch 2.13; the interleaved schedule warms up deeper,
holding up to 2 (pp - rank) - 1 micro-batches instead of pp - rank, with the same bubble.)"""


class Stage(nn.Module):
    """Pipeline stage `index` of `num_stages`: [embedding] + decoder layers `layers` + [norm, head, MTP].

    The modules are the model's own (same objects, same parameter values). The last stage registers the
    embedding too, which its MTP modules read: on the first stage's rank (a V) it is the same tensor,
    and the zero-bubble schedules' separate weight-gradient pass (W) must see it as this stage's
    parameter to add the MTP's part of its gradient; on another rank it is that rank's copy.
    """

    def __init__(self, model: DeepseekV3, index: int, num_stages: int, layers: range):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == num_stages - 1
        if self.first:
            self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleDict({str(i): model.decoder_layers[i] for i in layers})
        if self.last:
            self.norm, self.lm_head, self.mtp_layers = model.model.norm, model.lm_head, model.mtp_layers
            self.mtp_embed_tokens = model.model.embed_tokens
        # The whole model, unregistered (this stage's parameters are only those above): its helpers give
        # the rotary angles and the mask, and run the MTP chain through the modules registered here.
        object.__setattr__(self, "model", model)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """x: token ids (b, T) on the first stage, hidden states (b, T, dim) after; ids (b, T).
        Returns hidden states (b, T, dim), or on the last stage (main logits (b, T-1, vocab), MTP depth k's
        logits (b, T-1-k, vocab) for each k)."""
        if self.first:
            self.model.check_input_ids(ids)
            x = self.embed_tokens(ids.long())  # (b, T, dim)
        positions, cos, sin, mask = self.model._attention_inputs(ids, None, 0, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask, positions)
        if not self.last:
            return x
        h = self.norm(x)  # h^0 (b, T, dim)
        logits = [self.lm_head(h[:, :-1])]
        for k, hidden in enumerate(mtp_chain(self.model, h, ids), 1):
            logits.append(self.model.mtp_logits(k, hidden[:, : ids.shape[1] - 1 - k]))
        return tuple(logits)


def objective(logits: tuple[torch.Tensor, ...], ids: torch.Tensor, mtp_lambda: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's training loss from the last stage's logits (DeepseekV3.loss, eqs. 24-25):
    (main + lambda / D * sum_k L^k, main, (D,) per-depth losses)."""
    main = F.cross_entropy(rearrange(logits[0], "b t v -> (b t) v"), rearrange(ids[:, 1:], "b t -> (b t)").long())
    per_depth = [F.cross_entropy(rearrange(lk, "b t v -> (b t) v"),
                                 rearrange(ids[:, k + 1:k + 1 + lk.shape[1]], "b t -> (b t)").long())
                 for k, lk in enumerate(logits[1:], 1)]
    if not per_depth:
        return main, main, main.new_zeros(0)
    per_depth = torch.stack(per_depth)
    return main + mtp_lambda * per_depth.mean(), main, per_depth


def pipeline_stages(model: DeepseekV3, modules: list[Stage], layout: Layout, group, microbatch: int, seq_len: int
                    ) -> list[PipelineStage]:
    """torch's PipelineStage around each of this rank's stages, with their input and output shapes given
    (static mode: the schedule sends without first running the stage on meta tensors, which the routing
    and the all-to-alls could not do)."""
    cfg = model.config
    dtype = model.lm_head.weight.dtype
    hidden = torch.empty(microbatch, seq_len, cfg.hidden_size, dtype=dtype, requires_grad=True)  # sent both ways
    logits = tuple(torch.empty(microbatch, seq_len - 1 - k, cfg.vocab_size, dtype=dtype, requires_grad=True)
                   for k in range(len(model.mtp_layers) + 1))
    out = []
    for module in modules:
        inputs = torch.empty(microbatch, seq_len, dtype=torch.long) if module.first else hidden
        outputs = logits if module.last else hidden
        out.append(PipelineStage(module, module.index, layout.num_stages, model.device, input_args=inputs,
                                 output_args=outputs, group=group))
    return out


def schedule(stages: list[PipelineStage], layout: Layout, loss_fn: Callable):
    """The layout's schedule over this rank's stages; gradients are left unscaled (summed over the
    micro-batches: the trainer divides once, by micro-batches x data shards)."""
    cls = SCHEDULE_CLASSES[layout.schedule]
    held = stages[0] if layout.schedule == "gpipe" else stages
    return cls(held, n_microbatches=layout.microbatches, loss_fn=loss_fn, scale_grads=False)
