"""Mutation check: does the test suite catch the bugs people make when implementing DeepSeek-V3?

    .venv/bin/python tools/mutate.py            # every mutation; rewrites docs/mutations.md
    .venv/bin/python tools/mutate.py rope-half  # some of them, by id (report printed, docs untouched)

Each mutation below is one small, realistic bug: an exact piece of dsv3ref's source and what a
mistaken implementer would have written instead. For each, the repository is copied to a temporary
folder, the bug is applied there (and only there), and the tests run against the copy (`-x`: the
first failure is enough). The files named in `first` run first, then the rest of `tests/`;
notebooks are not run. A mutation the whole suite survives is reported as missed. The working
tree is never modified.

About 11 minutes on 2 cores (47 mutations, 2026-12-03, the machine busy), every mutation caught early;
`tests/test_mutations.py` checks, in CI, that every mutation still applies to the current source and
that docs/mutations.md lists exactly these mutations.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "mutations.md"


@dataclass(frozen=True)
class Mutation:
    id: str
    bug: str
    file: str
    old: str
    new: str
    first: tuple[str, ...] = ()


MUTATIONS = [
    # ---- the five bugs of issue 19, which passed the whole suite before it
    Mutation("rmsnorm-bf16-stats", "RMSNorm statistics computed in the input dtype (bf16) instead of float32",
             "dsv3ref/norm.py", "compute = torch.promote_types(x.dtype, torch.float32)", "compute = x.dtype",
             ("tests/test_norm.py",)),
    Mutation("balance-loss-no-kr", "sequence-wise balance loss without K_r in f_i (eq. 18)",
             "dsv3ref/routing.py", "* n_experts / (k * t)  # f_i", "* n_experts / t  # f_i", ("tests/test_router.py",)),
    Mutation("reject-resample-p", "a rejected speculative draft resampled from p instead of norm(max(0, p - q))",
             "dsv3ref/speculative.py", "residual = (target[j] - draft_probs[j]).clamp(min=0)", "residual = target[j]",
             ("tests/test_speculative.py",)),
    Mutation("mtp-draft-input", "the MTP drafter fed t_{i+k-1} instead of t_{i+k}",
             "dsv3ref/speculative.py", "known[mtp_from + k:p + k]", "known[mtp_from + k - 1:p + k - 1]",
             ("tests/test_speculative.py",)),
    Mutation("convert-shared-experts", "the converter leaving the shared experts unquantized",
             "dsv3ref/fp8.py", r"mlp\.(shared_experts\.|experts\.\d+\.)?", r"mlp\.(experts\.\d+\.)?",
             ("tests/test_fp8.py",)),
    # ---- RoPE and YaRN
    Mutation("rope-half", "RoPE rotating the two halves (GPT-NeoX layout) instead of interleaved pairs",
             "dsv3ref/rope.py", 'pairs = rearrange(x, "... (p two) -> ... p two", two=2)',
             'pairs = rearrange(x, "... (two p) -> ... p two", two=2)', ("tests/test_rope.py",)),
    Mutation("yarn-mscale-once", "YaRN's mscale applied once to the softmax scale instead of squared",
             "dsv3ref/rope.py", "scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2",
             "scale *= yarn_mscale(rs.factor, rs.mscale_all_dim)", ("tests/test_rope.py",)),
    Mutation("yarn-ramp-reversed", "YaRN's ramp reversed: high frequencies interpolated, low ones kept",
             "dsv3ref/rope.py", "return base_freq / rs.factor * ramp + base_freq * (1 - ramp)",
             "return base_freq * ramp + base_freq / rs.factor * (1 - ramp)", ("tests/test_rope.py",)),
    # ---- MLA
    Mutation("absorb-halves", "absorbed MLA splitting kv_b_proj as (dim, head) instead of (head, dim)",
             "dsv3ref/mla.py", "linear_weight(self.kv_b_proj, dtype).unflatten(0, (self.n_heads, -1))",
             "linear_weight(self.kv_b_proj, dtype).unflatten(0, (-1, self.n_heads)).transpose(0, 1)",
             ("tests/test_mla.py",)),
    Mutation("absorb-no-rope-score", "absorbed MLA leaving out the decoupled rotary part of the score",
             "dsv3ref/mla.py", 'scores = einsum(q_latent, c_kv, "b t h r, b s r -> b h t s") + einsum(',
             'scores = einsum(q_latent, c_kv, "b t h r, b s r -> b h t s") + 0 * einsum(',
             ("tests/test_mla.py",)),
    Mutation("paged-causal-shift", "paged MLA decoding letting each query see one position past its own",
             "dsv3ref/kernels/mla_decode.py", "last = seqlens - s_q + rearrange(",
             "last = seqlens - s_q + 1 + rearrange(", ("tests/test_kernels.py",)),
    Mutation("paged-page-of-position", "the paged cache writing position p into the page of p + 1",
             "dsv3ref/paged_cache.py", "pages = self.block_table.long().gather(1, positions // page)",
             "pages = self.block_table.long().gather(1, (positions + 1) // page)", ("tests/test_kernels.py",)),
    Mutation("dispatch-weights-not-local", "normal dispatch keeping the gate weights of experts on other ranks",
             "dsv3ref/kernels/ep.py", "torch.where(local, topk_weights, 0)", "topk_weights",
             ("tests/test_kernels.py",)),
    # ---- routing
    Mutation("router-bias-in-weights", "the balancing bias added to the gate values, not only to the choice",
             "dsv3ref/router.py", "weights = s.gather(1, ids)", "weights = (s + bias).gather(1, ids)",
             ("tests/test_router.py",)),
    Mutation("group-score-top1", "noaux_tc ranking groups by their best expert instead of the sum of the two best",
             "dsv3ref/router.py", "group_score = grouped.topk(2, dim=-1).values.sum(-1)",
             "group_score = grouped.topk(1, dim=-1).values.sum(-1)", ("tests/test_router.py",)),
    Mutation("bias-update-sign", "the bias update's sign flipped (overloaded experts made more attractive)",
             "dsv3ref/routing.py", "torch.sign(load.mean() - load)", "torch.sign(load - load.mean())",
             ("tests/test_router.py",)),
    Mutation("routed-scaling-missing", "routed_scaling_factor not applied to the gate values",
             "dsv3ref/router.py", "weights = weights * self.routed_scaling_factor", "weights = weights",
             ("tests/test_hf_parity.py",)),
    # ---- MTP
    Mutation("mtp-concat-order", "the MTP module concatenating [hidden ; embedding] (eq. 21's order) "
             "instead of the weights' [embedding ; hidden]", "dsv3ref/mtp.py",
             "torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1)",
             "torch.cat([self.hnorm(hidden), self.enorm(token_embeds)], dim=-1)", ("tests/test_mtp.py",)),
    # ---- FP8
    Mutation("fp8-scale-direction", "FP8 dequantization dividing by weight_scale_inv instead of multiplying",
             "dsv3ref/fp8.py", 'w = rearrange(blocks * scale_inv.to(compute)[..., None, None]',
             'w = rearrange(blocks / scale_inv.to(compute)[..., None, None]', ("tests/test_fp8.py",)),
    Mutation("fp8-tile-axis", "activation scales per token (over all K) instead of per 1 x 128 tile",
             "dsv3ref/fp8.py", "scale = tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / E4M3_MAX  # (..., kb)",
             "scale = tiles.abs().amax(dim=(-1, -2), keepdim=True)[..., 0].expand(tiles.shape[:-1])"
             ".clamp(min=AMAX_FLOOR) / E4M3_MAX", ("tests/test_fp8.py", "tests/test_chunking.py")),
    Mutation("e4m3-range", "E4M3's largest value taken as 240 (the FNUZ variant) instead of 448",
             "dsv3ref/fp8.py", "E4M3_MAX = 448.0", "E4M3_MAX = 240.0", ("tests/test_fp8.py", "tests/test_chunking.py")),
    Mutation("ue8m0-round", "UE8M0 scales rounded to the nearest power of two instead of up",
             "dsv3ref/fp8.py", "return torch.exp2(torch.ceil(torch.log2(scale)))",
             "return torch.exp2(torch.round(torch.log2(scale)))", ("tests/test_fp8.py",)),
    Mutation("convert-quantizes-eh-proj", "the converter quantizing the MTP module's eh_proj, which the release "
             "keeps in BF16", "dsv3ref/fp8.py", r'FP8_WEIGHT = re.compile(r"\.(self_attn',
             r'FP8_WEIGHT = re.compile(r"\.(eh_proj|self_attn', ("tests/test_fp8.py",)),
    # ---- text and generation
    Mutation("chat-no-bos", "the chat template rendered without the BOS token",
             "dsv3ref/tokenizer.py", "variables = dict(bos_token=self.bos_token,", 'variables = dict(bos_token="",',
             ("tests/test_text.py",)),
    Mutation("eos-stops-batch", "the first row to reach EOS stopping the whole batch",
             "dsv3ref/generate.py", "if all(finished) or step == max_new_tokens - 1:",
             "if any(finished) or step == max_new_tokens - 1:", ("tests/test_generate.py",)),
    Mutation("absorb-expanded-quantizes", "absorbed MLA's expanded order running kv_b_proj as an FP8 GEMM "
             "(issue 12)", "dsv3ref/mla.py", "kv = F.linear(c_kv, linear_weight(self.kv_b_proj, c_kv.dtype))",
             "kv = self.kv_b_proj(c_kv)", ("tests/test_chunking.py",)),
    # ---- training (issue 25)
    Mutation("clip-after-step", "gradient clipping applied after the optimizer step", "dsv3ref/train/loop.py",
             """            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if not math.isfinite(grad_norm):
                raise FloatingPointError(f"step {step + 1}: the gradient norm is {grad_norm}; stopping before the "
                                         "optimizer step (no checkpoint of this step is written)")
            optimizer.step()""",
             """            optimizer.step()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))""",
             (
             "tests/test_train.py::test_the_first_step_is_clipped_adamw_on_main_plus_lambda_over_d_mtp",)),
    Mutation("warmup-off-by-one", "the warmup's last step one too late: the learning rate overshoots its peak",
             "dsv3ref/train/loop.py", "    if step < cfg.warmup:", "    if step <= cfg.warmup:",
             (
             "tests/test_train.py::test_schedule_warms_up_linearly_peaks_once_and_decays_by_the_cosine_to_min_lr",)),
    Mutation("mtp-lambda-twice", "the MTP weight applied twice (lambda^2 * L_MTP)", "dsv3ref/mtp.py",
             "return mtp_lambda * per_depth.mean(), per_depth",
             "return mtp_lambda * mtp_lambda * per_depth.mean(), per_depth", (
             "tests/test_train.py::test_the_first_step_is_clipped_adamw_on_main_plus_lambda_over_d_mtp",)),
    Mutation("late-lambda-step", "the late MTP weight switched one step late", "dsv3ref/train/loop.py",
             "step >= cfg.mtp_switch * cfg.steps", "step > cfg.mtp_switch * cfg.steps", (
             "tests/test_train.py::test_the_late_mtp_weight_starts_at_its_switch_step",)),
    Mutation("decay-norm-gains", "weight decay applied to the RMSNorm gains", "dsv3ref/train/loop.py",
             """    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]""",
             """    decay = [p for n, p in model.named_parameters() if p.dim() >= 1]
    other = [p for n, p in model.named_parameters() if p.dim() < 1]""", (
             "tests/test_train.py::test_the_first_step_is_clipped_adamw_on_main_plus_lambda_over_d_mtp",)),
    Mutation("aux-unnormalized", "the classic auxiliary loss built from unnormalized scores",
             "dsv3ref/train/loop.py", "p = (rec.scores / rec.scores.sum(-1, keepdim=True)).mean(0)",
             "p = rec.scores.mean(0)", (
             "tests/test_train.py::test_the_classic_auxiliary_loss_by_hand",)),
    # ---- sampling
    Mutation("temperature-on-probs", "the temperature applied to the probabilities (undone by renormalizing) "
             "instead of the logits", "dsv3ref/sampling.py",
             "scaled = (logits - logits.amax(-1, keepdim=True)) / self.temperature",
             "scaled = logits - logits.amax(-1, keepdim=True)", (
             "tests/test_generate.py::test_sampler_probabilities_equal_softmax_of_filtered_logits_over_t_by_hand",)),
    Mutation("filter-before-temperature", "top-k/top-p filtering applied before the temperature",
             "dsv3ref/sampling.py", "return filter_logits(scaled, self.top_k, self.top_p).softmax(-1)",
             "return (filter_logits(logits, self.top_k, self.top_p) / self.temperature).softmax(-1)",
             (
             "tests/test_generate.py::test_sampler_probabilities_equal_softmax_of_filtered_logits_over_t_by_hand",)),
    # ---- data-parallel generation
    Mutation("dp-placeholder-row", "a rank with no prompt returning its placeholder row",
             "dsv3ref/parallel/launch.py", "for seq in out.tokens[: len(mine)]:",
             "for seq in out.tokens[: max(len(mine), 1)]:", (
             "tests/test_parallel.py::test_parallel_model_equals_single_process",)),
    Mutation("dp-eos-last-unfinished", "a row whose EOS is its last allowed token reported unfinished",
             "dsv3ref/parallel/launch.py", "finished.append(end < len(seq) or (bool(seq) and seq[-1] in eos))",
             "finished.append(end < len(seq))", (
             "tests/test_parallel.py::test_parallel_model_equals_single_process",)),
    Mutation("dp-eos-dropped", "the EOS token dropped from a data-parallel row", "dsv3ref/parallel/launch.py",
             "tokens.append(seq[:end])", "tokens.append([t for t in seq[:end] if t not in eos])",
             (
             "tests/test_parallel.py::test_parallel_model_equals_single_process",)),
    # ---- precision guards
    Mutation("router-bias-bf16", "the router bias rounded to bf16 when the model is cast", "dsv3ref/router.py",
             'self._buffers["e_score_correction_bias"] = before.to(device=after.device, dtype=torch.float32)',
             'self._buffers["e_score_correction_bias"] = after', (
             "tests/test_router.py::test_a_bf16_model_keeps_the_bias_in_float32_and_routes_as_float32_says",)),
    Mutation("ue8m0-activations", "activations quantized without the UE8M0 scale format the weights honour",
             "dsv3ref/fp8.py", "x_q, x_scale = quantize_activation(flat, scale_fmt=self.scale_fmt)",
             "x_q, x_scale = quantize_activation(flat)", (
             "tests/test_fp8.py::test_an_ue8m0_fp8_linear_quantizes_its_activations_with_power_of_two_scales_too",)),
    Mutation("softmax-bf16", "the attention softmax computed in bf16", "dsv3ref/mla.py",
             "compute = torch.promote_types(scores.dtype, torch.float32)", "compute = scores.dtype",
             (
             "tests/test_mla.py::test_bf16_attention_takes_its_softmax_in_float32_as_deepseek_does",)),
    # ---- compiled decoding
    Mutation("verify-cache-exact", "speculative decoding's compiled verification given a cache of the exact "
             "length each prompt needs (a new graph for every prompt length)", "dsv3ref/generate.py",
             "compiled_cache_length(model, needed) if compile else None,", "None,",
             ("tests/test_compile.py::test_generation_compiles_each_step_once_for_every_prompt_length",)),
    # ---- the planner and the split vocabulary
    Mutation("planner-dp-splits-ffn", "the planner splitting the dense and shared FFNs under data-parallel "
             "attention, where each rank holds them whole", "dsv3ref/parallel/planner.py",
             "w = _split(width, world, rank, unit, tp)", "w = _split(width, world, rank, unit, True)",
             (
             "tests/test_parallel.py::test_the_data_parallel_plan_equals_a_count_written_out",)),
    Mutation("vocab-boundary", "the vocabulary-split embedding treating each rank's first id as another's",
             "dsv3ref/parallel/layers.py", "outside = (local < 0) | (local >= self.num_embeddings)",
             "outside = (local < 1) | (local >= self.num_embeddings)", (
             "tests/test_parallel.py::test_parallel_model_equals_single_process",)),
    # ---- training across processes
    Mutation("tied-embedding-unsummed", "a straight pipeline's last rank updating its embedding copy from the MTP "
             "module's gradient alone, not summed with the first rank's", "dsv3ref/train/distributed/trainer.py",
             "_sum_gradients([self.embedding], self.groups.tied)", "pass", (
             "tests/test_train_distributed.py::test_four_processes_equal_one_for_combined_layouts",)),
    Mutation("bias-local-load", "each rank's router bias updated from the load of its own tokens, not the "
             "global batch's", "dsv3ref/train/distributed/trainer.py",
             "if dist.get_world_size(self.groups.data) > 1:", "if False:", (
             "tests/test_train_distributed.py::test_two_processes_equal_one_for_every_schedule_and_each_of_pp_ep_dp",)),
    Mutation("grad-mean-microbatches", "gradients averaged over the micro-batches but summed over the data shards",
             "dsv3ref/train/distributed/trainer.py", "scale = self.layout.microbatches * self.layout.data_shards",
             "scale = self.layout.microbatches", (
             "tests/test_train_distributed.py::test_two_processes_equal_one_for_every_schedule_and_each_of_pp_ep_dp",)),
    Mutation("mtp-embedding-unregistered", "the last stage reading the shared embedding without holding it as a "
             "parameter (the zero-bubble weight pass then drops the MTP's part of its gradient)",
             "dsv3ref/train/distributed/stages.py", "self.mtp_embed_tokens = model.model.embed_tokens", "pass", (
             "tests/test_train_distributed.py::test_two_processes_equal_one_for_every_schedule_and_each_of_pp_ep_dp",)),
]


def apply(tree: Path, m: Mutation) -> None:
    """Apply mutation m to the copy of the repository in `tree` (it must match exactly once)."""
    path = tree / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"mutation {m.id}: {m.file} contains the original {text.count(m.old)} times, expected once")
    path.write_text(text.replace(m.old, m.new))


def _copy(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(".venv", ".git", "notebooks", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _pytest(tree: Path, paths: list[str]) -> tuple[bool, str]:
    """Run pytest on paths inside tree; return (failed, the first failing test's id)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", "-o", "addopts=", *paths]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    failed = re.search(r"^FAILED (.+?)(?: - .*)?$", out.stdout, re.MULTILINE)
    if out.returncode not in (0, 1):
        return True, f"pytest exited {out.returncode} (collection error?): {out.stdout[-300:]}"
    return out.returncode == 1, failed.group(1) if failed else ""


def run(m: Mutation) -> dict:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tree = _copy(Path(tmp) / "repo")
        apply(tree, m)
        probe = subprocess.run([sys.executable, "-c", "import dsv3ref; print(dsv3ref.__file__)"], cwd=tree,
                               env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
        if not probe.stdout.startswith(str(tree)):
            raise RuntimeError(f"the copy's dsv3ref is not the one imported: {probe.stdout or probe.stderr}")
        caught, by = _pytest(tree, list(m.first)) if m.first else (False, "")
        if not caught:
            rest = sorted(str(p.relative_to(tree)) for p in (tree / "tests").glob("test_*.py")
                          if str(p.relative_to(tree)) not in m.first)
            caught, by = _pytest(tree, rest)
    return {"id": m.id, "bug": m.bug, "caught": caught, "by": by, "seconds": time.perf_counter() - start}


def report(results: list[dict]) -> str:
    caught = sum(r["caught"] for r in results)
    lines = [
        "# Mutation check: the bugs the tests catch",
        "",
        "Each row is one realistic DeepSeek-V3 bug applied alone to a copy of dsv3ref (the list, with the",
        "exact code each one changes, is in `tools/mutate.py`), and whether the test suite catches it.",
        "Regenerate with `.venv/bin/python tools/mutate.py`; `tests/test_mutations.py` checks that this",
        "page lists exactly the current mutations and that each still applies to the source.",
        "",
        f"**{caught} of {len(results)} caught.** The first five are the bugs that passed the whole suite "
        "before issue 19.",
        "",
        "| id | bug | caught | first failing test | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r['id']}` | {r['bug']} | {'yes' if r['caught'] else '**MISSED**'} | "
                     f"{'`' + r['by'] + '`' if r['by'] else ''} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not argv or m.id in argv]
    unknown = set(argv) - {m.id for m in MUTATIONS}
    if unknown:
        print(f"error: unknown mutation id(s) {sorted(unknown)}; known: {[m.id for m in MUTATIONS]}", file=sys.stderr)
        return 2
    results = []
    for m in chosen:
        r = run(m)
        results.append(r)
        print(f"{m.id:28s} {'caught' if r['caught'] else 'MISSED':7s} {r['seconds']:5.0f} s  {r['by']}", flush=True)
    text = report(results)
    if not argv:
        REPORT.write_text(text)
        print(f"wrote {REPORT}")
    return 0 if all(r["caught"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
