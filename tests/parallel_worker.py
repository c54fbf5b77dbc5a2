"""One rank of the multi-process tests (tests/test_parallel.py starts world_size of these).

Every case loads a checkpoint with dsv3ref.parallel.from_pretrained (sharded: each rank reads its part)
and compares with the single-process model loaded by DeepseekV3.from_pretrained on the same rank:
logits (float64, or the case's dtype) of an uncached batch, of a cached prefill and of decode steps,
and greedy generations. Rank 0 writes {case: measurements} as JSON; the test asserts on them.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import safetensors
import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3ref.checkpoint
from dsv3ref import DeepseekV3, generate, routing
from dsv3ref.mtp import checkpoint_copies
from dsv3ref.parallel import Parallel, ParallelError, from_pretrained
from dsv3ref.parallel.launch import generate_data_parallel, init_from_env
from dsv3ref.parallel.planner import exchange_bytes
from dsv3ref.prefill import prefill


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class ReadLog:
    """Wraps safetensors.safe_open to record the shape of every tensor the loader materializes."""

    def __init__(self):
        self.reads: list[tuple[str, tuple[int, ...], int]] = []

    def safe_open(self, *args, **kwargs):
        log = self

        class Handle:
            def __init__(self):
                self.f = safetensors.safe_open(*args, **kwargs)

            def __enter__(self):
                self.inner = self.f.__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name):
                t = self.inner.get_tensor(name)
                log.reads.append((name, tuple(t.shape), t.numel() * t.element_size()))
                return t

            def get_slice(self, name):
                sl = self.inner.get_slice(name)

                class Slice:
                    def get_shape(self):
                        return sl.get_shape()

                    def get_dtype(self):
                        return sl.get_dtype()

                    def __getitem__(self, index):
                        t = sl[index]
                        log.reads.append((name, tuple(t.shape), t.numel() * t.element_size()))
                        return t
                return Slice()
        return Handle()


def compare(model: DeepseekV3, ref: DeepseekV3, parallel: Parallel, rank: int, world: int) -> dict:
    """Logits and greedy tokens of the parallel model against the single-process one."""
    g = torch.Generator().manual_seed(11)
    vocab = ref.config.vocab_size
    result = {}
    # every id on a boundary of the vocabulary's split (ends of each rank's rows, however the split
    # rounds) appears in the inputs, with the first and the last id
    edges = {0, vocab - 1} | {min(max(r * step + d, 0), vocab - 1) for step in (vocab // world, -(-vocab // world))
                              for r in range(1, world) for d in (-1, 0, 1)}
    if parallel.layout == "tp":  # every rank the same batch
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        ids.view(-1)[: len(edges)] = torch.tensor(sorted(edges))
        errs = [rel_err(model(ids), ref(ids))]
        caches = [m.new_cache(3, 16) for m in (model, ref)]
        start = torch.tensor([0, 0, 0])
        outs = [m(ids[:, :5], c, 0) for m, c in zip((model, ref), caches, strict=False)]
        errs.append(rel_err(*outs))
        for step in range(3):  # decode at per-row positions
            pos = start + 5 + step
            outs = [m(ids[:, 5 + step: 6 + step], c, pos) for m, c in zip((model, ref), caches, strict=False)]
            errs.append(rel_err(*outs))
        if model.attn_impl == "absorb":  # the split model over a paged latent cache, against the static one
            paged = model.new_cache(3, 16, kind="paged")
            got = [model(ids[:, :5], paged, 0)] + [model(ids[:, 5 + s: 6 + s], paged, start + 5 + s) for s in range(3)]
            ref_cache = ref.new_cache(3, 16)
            want = [ref(ids[:, :5], ref_cache, 0)] + [ref(ids[:, 5 + s: 6 + s], ref_cache, start + 5 + s)
                                                      for s in range(3)]
            errs += [rel_err(a, b) for a, b in zip(got, want, strict=True)]
            result["paged_checked"] = True
        result["logits_rel_err"] = max(errs)
        prompts = [ids[0, :4].tolist(), ids[1, :7].tolist()]
        got = generate(model, prompts, 6, eos_token_id=[]).tokens
        want = generate(ref, prompts, 6, eos_token_id=[]).tokens
        result["tokens_equal"] = got == want
        # prefilled 3 tokens a pass (rows x positions: one position of each of the 2 rows)
        result["chunked_equal"] = generate(model, prompts, 6, eos_token_id=[], prefill_chunk=3).tokens == want
        if len(ref.mtp_layers):
            spec = generate(model, prompts[:1], 6, eos_token_id=[], speculative=True, prefill_chunk=2)
            result["speculative_equal"] = spec.tokens == want[:1]
    else:  # data-parallel attention: rank r holds its own rows, of its own length
        rows = torch.randint(0, vocab, (2 * world + 1, 8), generator=g)
        head = rows[:, :3].reshape(-1)  # the columns every prompt below holds
        head[: len(edges)] = torch.tensor(sorted(edges))
        rows[:, :3] = head.view(-1, 3)
        n_rows = 2 if rank < world - 1 else 3
        first = 2 * rank
        mine = rows[first:first + n_rows, : 5 + rank]
        result["logits_rel_err"] = rel_err(model(mine), ref(mine))
        prompts = [rows[i, : 3 + i % 4].tolist() for i in range(2 * world + 1)]
        got = generate_data_parallel(model, prompts, 5, eos_token_id=[]).tokens
        want = [generate(ref, [p], 5, eos_token_id=[]).tokens[0] for p in prompts]
        result["tokens_equal"] = got == want
        # ranks hold 2 or 3 rows of different lengths: prefilled 4 tokens a pass, all ranks in step
        chunked = generate_data_parallel(model, prompts, 5, eos_token_id=[], prefill_chunk=4)
        result["chunked_equal"] = chunked.tokens == want
        # fewer prompts than ranks (a rank holds none) and real end tokens: one that ends row 0 early (its
        # third token), then one that is the last allowed token of the last row (it still counts as finished)
        few = prompts[: world - 1]
        plain = [generate(ref, [p], 5, eos_token_id=[]).tokens[0] for p in few]
        equal, cases = True, []
        for eos, n in (([plain[0][2]], 5), ([plain[-1][0]], 1)):
            single = generate(ref, few, n, eos_token_id=eos)
            dp = generate_data_parallel(model, few, n, eos_token_id=eos)
            equal &= (dp.tokens, dp.finished) == (single.tokens, single.finished)
            cases.append(single.tokens[-1] == eos and single.finished[-1] if n == 1 else len(single.tokens[0]) < 5)
        result["few_equal"], result["eos_cases"] = equal, cases
    errs = [None] * world
    dist.all_gather_object(errs, result["logits_rel_err"])
    result["logits_rel_err"] = max(errs)
    return result


def gradients(model: DeepseekV3, ref: DeepseekV3, parallel: Parallel, rank: int, world: int) -> dict:
    """Gradients of the next-token loss through the split model against one process's.

    tp: every rank the same batch and the same loss; each rank's gradient of every tensor must equal
    its part of the single-process gradient, with no further communication. dp: each rank its own
    rows and the loss of its rows (scaled so that the ranks' losses add up to the mean over all rows);
    the routed experts' gradients must be whole as they are, the replicated tensors' once summed over
    the ranks (as data-parallel training sums them)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, ref.config.vocab_size, (2 * world, 7), generator=g)
    loss_fn = torch.nn.functional.cross_entropy
    whole = loss_fn(ref(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    whole.backward()
    if parallel.layout == "tp":
        loss = loss_fn(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    else:
        mine = ids[2 * rank: 2 * rank + 2]
        loss = loss_fn(model(mine[:, :-1]).flatten(0, 1), mine[:, 1:].flatten(), reduction="sum") / ids[:, 1:].numel()
    loss.backward()
    reference = dict(ref.named_parameters())
    shards = model.parallel.shards
    errs, missing = {}, []
    for name, p in model.named_parameters():
        grad = p.grad
        if reference[name].grad is None:  # not on the loss's path (the MTP module)
            continue
        if grad is None:
            missing.append(name)
            continue
        expert = ".experts." in name
        if parallel.layout == "dp" and not expert:
            grad = grad.clone()
            dist.all_reduce(grad)
        want = reference[name].grad
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stacked: this rank's experts
            state = model.get_submodule(name.rsplit(".", 1)[0])
            want = want[state.first_expert: state.first_expert + state.n_experts]
        elif name in shards:
            want = want[shards[name].index(want.dim())]
        errs[name] = rel_err(grad, want) if want.abs().max() > 0 else float(grad.abs().max())
    worst = max(errs, key=errs.get)
    result = {"grad_rel_err": errs[worst], "worst": worst, "missing_grads": missing, "tensors": len(errs)}
    gathered = [None] * world
    dist.all_gather_object(gathered, errs[worst])
    result["grad_rel_err"] = max(gathered)
    return result


COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class CollectiveLog(TorchDispatchMode):
    """Records the bytes of the input handed to every one of torch's functional collectives."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "_c10d_functional" and func.__name__.split(".")[0] in COLLECTIVES:
            name = func.__name__.split(".")[0]
            self.bytes[name] = self.bytes.get(name, 0) + args[0].nbytes
        return func(*args, **(kwargs or {}))


def exchanged(model: DeepseekV3, parallel: Parallel, rank: int, world: int) -> dict:
    """Bytes handed to each collective in one prefill pass and one decode step, against
    dsv3ref.parallel.planner.exchange_bytes fed this run's routing (which ranks each token went to)."""
    cfg = model.config
    g = torch.Generator().manual_seed(17 + (rank if parallel.layout == "dp" else 0))
    rows = 3 if parallel.layout == "tp" else 2 + rank % 2  # dp: ranks with different numbers of rows
    ids = torch.randint(0, cfg.vocab_size, (rows, 7), generator=g)
    per_rank = cfg.n_routed_experts // world
    counts = [None] * world
    dist.all_gather_object(counts, rows)
    result = {}
    cache = model.new_cache(rows, 8)
    for phase, run in (("prefill", lambda: prefill(model.hidden_states, ids[:, :6], cache, 1000,
                                                   keep=lambda p0, h: model.lm_head(h[:, -1]))),
                       ("decode", lambda: model(ids[:, 6:], cache, torch.full((rows,), 6)))):
        with routing.capture(model) as records, CollectiveLog() as log:
            run()
        n = records[cfg.first_k_dense_replace][0].ids.shape[0]
        # per MoE layer: (token, rank) pairs this rank dispatches, by destination
        sent = []
        for layer in sorted(layer for layer in records if records[layer]):  # (the MTP module does not run)
            owner = records[layer][0].ids // per_rank  # (n, k)
            if parallel.layout == "tp":  # each rank dispatches its slice of the (same) tokens
                m = -(-n // world)
                owner = owner[rank * m:(rank + 1) * m]
            goes = torch.zeros(owner.shape[0], world, dtype=torch.bool).scatter_(1, owner, True)
            sent.append(goes.sum(0).tolist())
        everyone = [None] * world
        dist.all_gather_object(everyone, sent)
        pairs = [(sum(sent[i]), sum(everyone[q][i][rank] for q in range(world))) for i in range(len(sent))]
        tokens = n if parallel.layout == "tp" or parallel.moe_comm == "alltoall" else max(counts) * n // rows
        want = exchange_bytes(cfg, world, parallel.layout, parallel.moe_comm, tokens, rows, model.dtype, pairs)
        result[phase] = {"counted": log.bytes, "formula": want}
    return result


def compiled(model: DeepseekV3, ref: DeepseekV3, case: dict) -> dict:
    """The split model's decode step under torch.compile(fullgraph=True): the graphs dynamo captures over
    20 steps at moving positions (recompiling is an error), and, with inductor, generate(compile=True)'s
    tokens against eager and one process."""
    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(model, fullgraph=True, dynamic=False, backend=counter)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(23)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        cache = model.new_cache(2, 48)
        model(torch.randint(0, vocab, (2, 20), generator=g), cache, 0)
        for i in range(20):
            step(torch.randint(0, vocab, (2, 1), generator=g), cache, torch.tensor([20, 9]) + i)
    result = {"graphs": counter.frame_count}
    if case.get("inductor"):
        prompts = [[1, 2, 3, 4], [5, 6, 7]]
        eager = generate(model, prompts, 8, eos_token_id=[]).tokens
        result["compiled_equal"] = generate(model, prompts, 8, eos_token_id=[], compile=True).tokens == eager
        result["single_equal"] = generate(ref, prompts, 8, eos_token_id=[]).tokens == eager
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world, _ = init_from_env(timeout_s=spec.get("timeout_s", 60))
    torch.set_num_threads(1)
    results = {}
    for case in spec["cases"]:
        name = case["name"]
        if "die_rank" in case:  # this rank exits; the others' next collective must fail, not wait for ever
            if rank == case["die_rank"]:
                sys.exit(3)
            try:
                dist.all_reduce(torch.ones(1))
                dist.all_reduce(torch.ones(1))
            except RuntimeError as e:  # gloo: DistBackendError on a timeout, RuntimeError on a closed peer
                print(f"rank {rank}: collective failed: {e}", file=sys.stderr)
                sys.exit(4)
            sys.exit(0)
        try:
            parallel = Parallel(case["layout"], case["moe_comm"])
            kw = dict(dtype=getattr(torch, case.get("dtype", "float64")), attn_impl=case["attn_impl"],
                      moe_impl=case["moe_impl"], gemm_impl=case.get("gemm_impl", "bf16"))
            log = ReadLog()
            real = dsv3ref.checkpoint.safe_open
            dsv3ref.checkpoint.safe_open = log.safe_open
            try:
                model = from_pretrained(case["ckpt"], parallel=parallel, **kw)
            finally:
                dsv3ref.checkpoint.safe_open = real
            ref = DeepseekV3.from_pretrained(case["ckpt"], **kw)
            if case.get("kind") == "compile":
                result = compiled(model, ref, case)
                gathered = [None] * world
                dist.all_gather_object(gathered, result)
                results[name] = gathered
                continue
            if case.get("kind") == "bytes":
                with torch.inference_mode():
                    result = exchanged(model, parallel, rank, world)
                gathered = [None] * world
                dist.all_gather_object(gathered, result)
                results[name] = gathered
                continue
            if case.get("kind") == "grad":
                result = gradients(model.train(), ref.train(), parallel, rank, world)
                gathered = [None] * world
                dist.all_gather_object(gathered, result)
                results[name] = gathered
                continue
            with torch.inference_mode():
                result = compare(model, ref, parallel, rank, world)
            shards = model.parallel.shards
            full = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
            result["bytes_read"] = model.load_report.bytes_read
            result["bytes_logged"] = sum(b for _, _, b in log.reads)
            # a read of a split tensor whose shape is the whole tensor's: another rank's part was built
            result["whole_split_reads"] = [n for n, shape, _ in log.reads
                                           if n in shards and shape == full.get(n) and len(set(shape)) and
                                           shards[n].stop - shards[n].start != full[n][shards[n].dim]]
            result["reference_bytes_read"] = ref.load_report.bytes_read
            copies = checkpoint_copies(ref.config)
            # tensors every rank reads whole: neither split nor an expert (each expert lives on one rank)
            result["replicated_bytes"] = sum(b for n, _, b in log.reads if copies.get(n, n) not in shards
                                             and ".mlp.experts." not in n)
        except ParallelError as e:
            result = {"error": str(e)}
        except Exception:
            result = {"crash": traceback.format_exc()}
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        results[name] = gathered
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
