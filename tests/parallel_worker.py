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
import torch.distributed as dist

import dsv3ref.checkpoint
from dsv3ref import DeepseekV3, generate
from dsv3ref.mtp import checkpoint_copies
from dsv3ref.parallel import Parallel, ParallelError, from_pretrained
from dsv3ref.parallel.launch import generate_data_parallel, init_from_env


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
    if parallel.layout == "tp":  # every rank the same batch
        ids = torch.randint(0, vocab, (3, 9), generator=g)
        errs = [rel_err(model(ids), ref(ids))]
        caches = [m.new_cache(3, 16) for m in (model, ref)]
        start = torch.tensor([0, 0, 0])
        outs = [m(ids[:, :5], c, 0) for m, c in zip((model, ref), caches, strict=False)]
        errs.append(rel_err(*outs))
        for step in range(3):  # decode at per-row positions
            pos = start + 5 + step
            outs = [m(ids[:, 5 + step: 6 + step], c, pos) for m, c in zip((model, ref), caches, strict=False)]
            errs.append(rel_err(*outs))
        result["logits_rel_err"] = max(errs)
        prompts = [ids[0, :4].tolist(), ids[1, :7].tolist()]
        got = generate(model, prompts, 6, eos_token_id=[]).tokens
        want = generate(ref, prompts, 6, eos_token_id=[]).tokens
        result["tokens_equal"] = got == want
        if len(ref.mtp_layers):
            spec = generate(model, prompts[:1], 6, eos_token_id=[], speculative=True)
            result["speculative_equal"] = spec.tokens == want[:1]
    else:  # data-parallel attention: rank r holds its own rows, of its own length
        rows = torch.randint(0, vocab, (2 * world + 1, 8), generator=g)
        n_rows = 2 if rank < world - 1 else 3
        first = 2 * rank
        mine = rows[first:first + n_rows, : 5 + rank]
        result["logits_rel_err"] = rel_err(model(mine), ref(mine))
        prompts = [rows[i, : 3 + i % 4].tolist() for i in range(2 * world + 1)]
        got = generate_data_parallel(model, prompts, 5, eos_token_id=[]).tokens
        want = [generate(ref, [p], 5, eos_token_id=[]).tokens[0] for p in prompts]
        result["tokens_equal"] = got == want
    errs = [None] * world
    dist.all_gather_object(errs, result["logits_rel_err"])
    result["logits_rel_err"] = max(errs)
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
