"""The command line: `python -m dsv3ref demo | generate | chat | compare | plan | train`.

`generate` and `chat` also run under torchrun, split over the processes it starts (tensor and
expert parallelism, see dsv3ref.parallel): `torchrun --nproc-per-node 8 -m dsv3ref generate
--ckpt-path DIR --prompt ...`. Only rank 0 reads input and prints.

Without --ckpt-path, `generate` and `chat` run on an embedded default: the tiny preset with the real
DeepSeek-V3 tokenizer's vocabulary, built on the spot with random weights. It is untrained, so its
text is noise; it is there to show the whole pipeline (template, tokenizer, MLA cache, MoE,
sampling, streaming) working in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3ref import DeepseekV3, ModelConfig, count_parameters, generate, save_pretrained
from dsv3ref.argtypes import integer as _integer
from dsv3ref.argtypes import number as _number
from dsv3ref.checkpoint import resolve_dtype, resolve_implementation, stores_fp8
from dsv3ref.impl import AUTO, CHOICES, Implementation
from dsv3ref.oracle import compare, trace, trace_hf
from dsv3ref.parallel import Parallel, from_pretrained, parallelize
from dsv3ref.parallel.launch import (
    DEFAULT_LOAD_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    LaunchError,
    agree,
    agree_on_files,
    available_memory,
    check_memory,
    checkpoint_identity,
    describe_failure,
    generate_data_parallel,
    generation_group,
    init_from_env,
    launched_by_torchrun,
)
from dsv3ref.parallel.planner import GIB, GPU_MEMORY, RESERVE_BYTES, format_table, machine_table, plan
from dsv3ref.parallel.simulation import simulate
from dsv3ref.prefill import DEFAULT_PREFILL_CHUNK
from dsv3ref.tokenizer import StreamDecoder, Tokenizer, check_text
from dsv3ref.train import TrainConfig, train
from dsv3ref.train.checkpoint import TRAJECTORY_FIELDS
from dsv3ref.train.distributed import SCHEDULES, Layout, train_distributed
from dsv3ref.train.fp8 import TRAINING_KERNELS
from dsv3ref.train.loop import DTYPES as TRAIN_DTYPES

UNTRAINED = "embedded tiny model, random weights, UNTRAINED (its text is noise), with the DeepSeek-V3 tokenizer"


class CliError(Exception):
    """A problem with the user's input: printed as `error: ...`, exit status 2."""


# What a user's input can cause: a bad checkpoint, config, argument or file (each message names it),
# or a model whose arithmetic produces NaN. Printed as `error: ...` with exit status 2, no traceback.
USER_ERRORS = (CliError, ValueError, TypeError, OSError, FloatingPointError, LaunchError)


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**64), which torch's generators accept."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), found {value}")
    return value


DTYPES = {"auto": AUTO, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
"""--dtype's values: "auto" is bfloat16 on CUDA, float32 on a CPU."""


def requests(args: argparse.Namespace) -> dict:
    """The --attn-impl ... --fp8-kernel flags, as loading takes them ("auto" decided by the loader)."""
    return dict(attn_impl=args.attn_impl, attn_order=args.attn_order, moe_impl=args.moe_impl,
                gemm_impl=args.gemm_impl, fp8_kernel=args.fp8_kernel)


def embedded_config() -> ModelConfig:
    """The embedded model: the tiny preset with the DeepSeek-V3 tokenizer's vocabulary."""
    return ModelConfig.preset("tiny").replace(vocab_size=ModelConfig.preset("deepseek-v3").vocab_size)


def _checkpoint_folder(ckpt_path: str) -> tuple[Path, Tokenizer]:
    """--ckpt-path as a folder, and its tokenizer; CliError naming what is missing."""
    path = Path(ckpt_path)
    if not path.is_dir():
        raise CliError(f"--ckpt-path {path}: no such checkpoint folder")
    try:
        return path, Tokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None


def load_for_text(ckpt_path: str | None, seed: int = 0, impl: Implementation | None = None,
                  parallel: Parallel | None = None, device: str | torch.device = "cpu", *,
                  group: dist.ProcessGroup | None = None, **load) -> tuple[DeepseekV3, Tokenizer, str]:
    """The model and tokenizer of a checkpoint folder, or the embedded default. parallel: split the
    model over `group` (default: the world; each rank reads only its part of the checkpoint). impl: how
    it computes (default: absorbed attention, grouped experts); or, for a checkpoint, `load`: the
    keywords of from_pretrained ("auto" allowed: dtype, gemm_impl, fp8_kernel, moe_impl; mtp)."""
    if ckpt_path is None:
        impl = impl or Implementation(attn_impl="absorb", moe_impl="grouped")
        if load.get("moe_impl", impl.moe_impl) != AUTO:
            impl = impl.replace(**{k: v for k, v in load.items() if k in ("attn_impl", "attn_order", "moe_impl")})
        tokenizer = Tokenizer.from_pretrained()
        cfg = embedded_config()
        if load.get("mtp") is False:  # as a checkpoint's MTP module is left unread
            cfg = cfg.replace(num_nextn_predict_layers=0)
        torch.manual_seed(seed)
        model = DeepseekV3(cfg, impl=impl).eval()
        if parallel is not None:
            parallelize(model, group, parallel)
        return model.to(device, resolve_dtype(load.get("dtype", torch.float32), device)), tokenizer, UNTRAINED
    path, tokenizer = _checkpoint_folder(ckpt_path)
    keywords = dict(dataclasses.asdict(impl) if impl is not None else {}, **load)
    if parallel is not None:
        model = from_pretrained(path, group, parallel, device=device, **keywords)
    else:
        model = DeepseekV3.from_pretrained(path, device=device, **keywords)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CliError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                       f"{model.config.vocab_size}")
    return model, tokenizer, f"checkpoint {path}"


def _prompt_ids(tokenizer: Tokenizer, messages: list[dict], raw: bool) -> list[int]:
    if raw:
        return tokenizer.encode(messages[-1]["content"])
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _reply(model, tokenizer, ids, args, out) -> list[int]:
    """Generate after ids, streaming text to `out`; return the new tokens."""
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        raise CliError(f"the prompt is {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} that exceeds "
                       f"the model's max_position_embeddings={limit}")
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)

    def stream(tokens):
        piece = decoder.push(tokens[0])
        if piece:
            out.write(piece)
            out.flush()

    options = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   eos_token_id=tokenizer.eos_token_id, seed=args.seed, compile=getattr(args, "compile", False),
                   prefill_chunk=getattr(args, "prefill_chunk", DEFAULT_PREFILL_CHUNK),
                   cache_kind=getattr(args, "cache", "static"))
    if getattr(args, "speculative", False):
        options["speculative"] = True
    if model.parallel is not None and model.parallel.parallel.layout == "dp":  # all ranks step together
        tokens = generate_data_parallel(model, [ids], args.max_new_tokens, **options).tokens[0]
        out.write(tokenizer.decode(tokens, skip_special_tokens=True))
    else:
        tokens = generate(model, [ids], args.max_new_tokens, stream=stream, **options).tokens[0]
    out.write("\n")
    return tokens


def _device(args: argparse.Namespace, torchrun_device: torch.device | None) -> torch.device:
    if torchrun_device is not None:
        return torchrun_device
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _summary(model: DeepseekV3, prefill_chunk: int, cache: str = "static") -> str:
    """How the launched model computes, in words (printed once at the start)."""
    impl = model.impl
    gemm = f"fp8 GEMMs ({impl.fp8_kernel})" if impl.gemm_impl == "fp8" else f"{str(model.dtype)[6:]} GEMMs"
    mtp = f"MTP loaded ({len(model.mtp_layers)})" if len(model.mtp_layers) else "MTP not loaded"
    return (f"{gemm}, {str(model.dtype)[6:]} on {model.device}, attention {impl.attn_impl}, experts {impl.moe_impl}, "
            f"{mtp}, prefill {prefill_chunk} tokens a pass" + (", paged latent cache" if cache == "paged" else ""))


def _text_model(args: argparse.Namespace, seq_len: Callable[[Tokenizer], int]
                ) -> tuple[DeepseekV3, Tokenizer, str, bool]:
    """The model of generate/chat: on one process, or split over torchrun's processes (then joined
    into process groups first). seq_len(tokenizer): the positions of cache the launch plans for.
    Returns (model, tokenizer, label, whether this rank prints).

    Before anything is allocated, the plan of the launch is compared with the memory the device has
    (`check_memory`); under torchrun every rank's verdict is exchanged before loading, and again after
    it (the barrier after loading, within --load-timeout); generation then runs on a group of its own
    whose collectives fail after --timeout."""
    torchrun = launched_by_torchrun()
    if not torchrun and (args.layout != "tp" or args.moe_comm != "allreduce"):
        raise CliError("--layout/--moe-comm choose how the model is split over processes: launch with "
                       "torchrun --nproc-per-node N -m dsv3ref ...")
    if args.speculative and args.layout == "dp":
        raise CliError("--speculative: not available with --layout dp (each rank would call the model a different "
                       "number of times); use --layout tp")
    if args.cache == "paged" and (args.attn_impl != "absorb" or args.compile):
        raise CliError("--cache paged: pages the latent cache of --attn-impl absorb, read eagerly (found "
                       f"--attn-impl {args.attn_impl}{' --compile' if args.compile else ''})")
    if torchrun and args.compile and (args.layout, args.moe_comm) != ("tp", "allreduce"):
        raise CliError(f"--compile under torchrun: supported with --layout tp --moe-comm allreduce (the exchange of "
                       f"--layout {args.layout} --moe-comm {args.moe_comm} has sizes that depend on the routing, "
                       "which one compiled graph per step cannot hold)")
    rank, world, group, parallel, torchrun_device = 0, 1, None, None, None
    if torchrun:
        rank, world, torchrun_device = init_from_env(args.load_timeout)
        group = generation_group(args.timeout)
        parallel = Parallel(args.layout, args.moe_comm)
    device = _device(args, torchrun_device)
    dtype = resolve_dtype(DTYPES[args.dtype], device)
    mtp = bool(args.speculative)
    failure, identity = None, {}
    try:
        if args.ckpt_path is None:
            cfg, fp8, tokenizer = embedded_config(), False, Tokenizer.from_pretrained()
        else:
            path, tokenizer = _checkpoint_folder(args.ckpt_path)
            identity = checkpoint_identity(path)
            cfg, fp8 = ModelConfig.from_pretrained(path), stores_fp8(path)
        impl = resolve_implementation(fp8, device, **requests(args))
        available, where = available_memory(device)
        if args.max_memory_gib is not None:
            available, where = int(args.max_memory_gib * GIB), f"--max-memory-gib is {args.max_memory_gib:g}"
        try:
            check_memory(cfg, world, parallel or Parallel(), impl, dtype, batch_size=1,
                         seq_len=min(seq_len(tokenizer), cfg.max_position_embeddings),
                         prefill_chunk=args.prefill_chunk, mtp=mtp, device=device, available=available, where=where,
                         stores_fp8=fp8)
        except ValueError as e:  # a world size that does not divide the model
            raise CliError(f"world size {world} does not fit this model: {e}") from None
    except Exception as e:  # noqa: BLE001 - every rank must hear of it before anyone allocates
        failure = e
    if torchrun:
        agree("the start", failure, "another rank did not reach the start (it exited, or --load-timeout passed)")
        if args.ckpt_path is not None:
            agree_on_files(identity, args.ckpt_path)
    elif failure is not None:
        raise failure
    try:
        model, tokenizer, label = load_for_text(args.ckpt_path, args.seed, None, parallel, device, group=group,
                                                dtype=dtype, mtp=mtp, **requests(args))
    except Exception as e:  # noqa: BLE001
        failure = e
    if torchrun:
        agree("loading", failure, f"the other ranks did not finish loading within --load-timeout "
                                  f"{args.load_timeout:g} s (a slow disk, or a rank that died)")
        if args.ckpt_path is not None:
            agree_on_files({"tensor names, shapes and dtypes": model.load_report.headers_sha256}, args.ckpt_path)
        label += f"; rank {rank} of {world}, layout {args.layout}, {args.moe_comm}"
    elif failure is not None:
        raise failure
    summary = _summary(model, args.prefill_chunk, getattr(args, "cache", "static"))
    return model, tokenizer, f"{label}; {summary}", rank == 0


CHAT_PLANNED_HISTORY = 4096
"""chat plans its memory for a conversation of this many tokens before the reply (a longer one may need more)."""


def generate_cmd(args: argparse.Namespace) -> int:
    check_text(args.prompt, "--prompt")

    def prompt(tokenizer: Tokenizer) -> list[int]:
        return _prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}], args.raw)

    model, tokenizer, label, speaks = _text_model(args, lambda tok: len(prompt(tok)) + args.max_new_tokens)
    out = sys.stdout if speaks else io.StringIO()
    if speaks:
        print(f"[{label}]", file=sys.stderr)
    _reply(model, tokenizer, prompt(tokenizer), args, out)
    return 0


def _read_line(speaks: bool) -> str:
    """A line of stdin, read by rank 0 and sent to the other ranks (all of them generate together)."""
    line = ""
    if speaks:  # bytes that are not UTF-8 are kept (as surrogates) and reported by the caller, line by line
        stream = getattr(sys.stdin, "buffer", None)
        line = stream.readline().decode("utf-8", "surrogateescape") if stream is not None else sys.stdin.readline()
    if dist.is_initialized():
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def chat_cmd(args: argparse.Namespace) -> int:
    model, tokenizer, label, speaks = _text_model(args, lambda tok: CHAT_PLANNED_HISTORY + args.max_new_tokens)
    interactive = sys.stdin.isatty() and speaks
    err = sys.stderr if speaks else io.StringIO()
    out = sys.stdout if speaks else io.StringIO()
    print(f"[{label}]\n[type a message; /reset clears the history, /exit or end of input quits]", file=err)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        if interactive:
            print("> ", end="", flush=True, file=err)
        line = _read_line(speaks)
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            print("[history cleared]", file=err)
            continue
        if not text.strip():
            continue
        try:
            check_text(text, "input")
        except ValueError as e:
            print(f"error: {e}; the line was ignored", file=err)
            continue
        messages.append({"role": "user", "content": text})
        try:
            reply = _reply(model, tokenizer, _prompt_ids(tokenizer, messages, raw=False), args, out)
        except CliError as e:
            messages.pop()
            print(f"error: {e} (use /reset to start over)", file=err)
            continue
        messages.append({"role": "assistant", "content": tokenizer.decode(reply, skip_special_tokens=True)})


def demo(args: argparse.Namespace) -> int:
    """Build the embedded tiny model, run it, save and reload it, generate text; report DeepSeek-V3's size."""
    full = count_parameters(ModelConfig.preset("deepseek-v3"))
    print(f"DeepSeek-V3 (published config): {full.total / 1e9:.1f}B parameters, "
          f"{full.activated / 1e9:.1f}B activated per token, MTP module {full.mtp / 1e9:.1f}B")
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(args.seed)
    model = DeepseekV3(cfg).eval()
    tiny = count_parameters(cfg)
    print(f"tiny preset (random weights, untrained): {tiny.total:,} parameters + {tiny.mtp:,} in its MTP module, "
          f"{cfg.num_hidden_layers} layers, {cfg.n_routed_experts} routed experts")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    print(f"forward of {tuple(ids.shape)} token ids -> logits {tuple(logits.shape)} "
          f"in {1e3 * (time.perf_counter() - start):.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        again = DeepseekV3.from_pretrained(tmp)
        with torch.no_grad():
            same = torch.equal(again(ids), logits)
    print(f"save_pretrained -> from_pretrained reproduces the logits bit for bit: {same}")
    text_model, tokenizer, label = load_for_text(None, args.seed)
    prompt = "Hello, how are you?"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    print(f"chat prompt {prompt!r} -> {len(ids)} tokens: {tokenizer.decode(ids)!r}")
    print(f"[{label}] reply: ", end="")
    _reply(text_model, tokenizer, ids, argparse.Namespace(max_new_tokens=12, temperature=0.0, top_p=1.0, top_k=0,
                                                          seed=args.seed), sys.stdout)
    return 0 if same else 1


def compare_cmd(args: argparse.Namespace) -> int:
    """Trace dsv3ref's readable path and another implementation on the same checkpoint; print where
    they diverge."""
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    reference = DeepseekV3.from_pretrained(args.ckpt, dtype=dtype)
    cfg = reference.config
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=generator)
    if args.against == "hf":
        from transformers import DeepseekV3ForCausalLM  # optional (the test extra): imported only when asked

        other = DeepseekV3ForCausalLM.from_pretrained(args.ckpt, dtype=dtype, attn_implementation="eager").eval()
        other_trace = trace_hf(other, ids)
    else:
        other = DeepseekV3.from_pretrained(args.ckpt, dtype=dtype, attn_impl="absorb", moe_impl="grouped")
        other_trace = trace(other, ids)
    result = compare(trace(reference, ids), other_trace, rtol=args.rtol, atol=args.atol)
    print(f"reference: dsv3ref (naive, loop, {args.dtype}); other: {args.against}; input {tuple(ids.shape)}, "
          f"seed {args.seed}; tolerance atol {args.atol} + rtol {args.rtol} * max|ref|")
    print(result)
    return 0 if result.ok else 1


def plan_cmd(args: argparse.Namespace) -> int:
    """Print the per-GPU memory plan of a configuration (default: the released DeepSeek-V3); with
    --simulate, beside what the launch's code allocates on fake tensors (dsv3ref.parallel.simulation)."""
    cfg = (ModelConfig.preset("deepseek-v3") if args.config == "deepseek-v3"
           else ModelConfig.from_pretrained(Path(args.config)))
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else torch.bfloat16
    if args.world_size is None:
        if args.simulate:
            raise CliError("--simulate runs one launch: give its --world-size")
        print(f"DeepSeek-V3 per GPU, batch {args.batch_size} x {args.seq_len} tokens of latent cache "
              f"({str(dtype)[6:]}), prefill {args.prefill_chunk} tokens a pass, main model without MTP; reserve "
              f"{RESERVE_BYTES / GIB:g} GiB per GPU; GiB = 2^30 bytes, as the GPUs report their memory")
        print(format_table(machine_table(cfg, args.batch_size, args.seq_len, layouts=args.layout,
                                         gemm_impl=args.gemm_impl, dtype=dtype, prefill_chunk=args.prefill_chunk,
                                         moe_comm=args.moe_comm, gpu_memory_gib=args.gpu_memory_gib)))
        return 0
    layout, gemm = args.layout or "tp", args.gemm_impl or "fp8"
    moe_comm = args.moe_comm or ("alltoall" if layout == "dp" else "allreduce")
    gpu_memory_gib = args.gpu_memory_gib or GPU_MEMORY["H200-141GB"] / GIB
    p = plan(cfg, args.world_size, layout, gemm, gpu_memory_gib, args.batch_size, args.seq_len,
             args.prefill_chunk, args.mtp, dtype=dtype, moe_comm=moe_comm)
    sim = None
    if args.simulate:
        sim = simulate(cfg, args.world_size, 0, Parallel(layout, moe_comm), dtype=dtype, gemm_impl=gemm,
                       batch_size=args.batch_size, seq_len=args.seq_len, prefill_chunk=args.prefill_chunk,
                       mtp=args.mtp)
    print(f"world size {p.world_size}, layout {p.layout}, {moe_comm}, gemm_impl {p.gemm_impl}, {str(dtype)[6:]}, batch "
          f"{p.batch_size} x {p.seq_len} tokens, prefill {p.prefill_chunk} tokens a pass, MTP "
          f"{'loaded' if p.mtp else 'not loaded'}; GPU {p.gpu_memory / GIB:.1f} GiB")
    rows = [("weights", p.weights, sim and sim.weights, "the largest rank's, exact"),
            ("derived", p.derived, None, "kept beside the weights"),
            ("cache", p.cache, sim and sim.cache, ""),
            ("activations", p.activations + p.derived, sim and sim.activations,
             "the larger of a prefill pass and a decode step (derived included)"),
            ("reserve", p.reserve, None, "CUDA context, NCCL, allocator slack"),
            ("peak", p.used - p.reserve, sim and sim.peak, "all but the reserve")]
    print(f"  {'':12} {'plan GiB':>9}" + (f" {'simulated GiB':>14}" if sim else ""))
    for name, planned, simulated, note in rows:
        shown = "" if sim is None else (f" {simulated / GIB:14.2f}" if simulated is not None else " " * 15)
        print(f"  {name:12} {planned / GIB:9.2f}{shown}  {note}")
    if sim:
        print(f"  (simulated: rank 0 of {sim.world_size} on fake tensors, {sim.impl.gemm_impl} GEMMs through "
              f"{sim.impl.fp8_kernel if sim.impl.gemm_impl == 'fp8' else 'dense'}; the plan is "
              f"{(p.used - p.reserve) / sim.peak:.3f}x the simulated peak)")
    print(f"  cache tokens that fit: {p.cache_tokens_fit:,} per GPU, {p.total_tokens_fit:,} in all")
    print(f"  fits: {'yes' if p.fits else 'NO'}")
    return 0 if p.fits else 1


def train_cmd(args: argparse.Namespace) -> int:
    """Train the small model on the standard library's bytes (dsv3ref.train); print the final metrics.
    Under torchrun, with --pp/--ep/--dp/--schedule: across processes (dsv3ref.train.distributed)."""
    cfg = TrainConfig(out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup, mtp_lambda=args.mtp_lambda,
                      mtp_lambda_late=args.mtp_lambda_late, device=args.device,
                      balance=args.balance, gamma=args.gamma, gamma_late=args.gamma_late, seq_alpha=args.seq_alpha,
                      fp8=args.fp8, fp8_kernel=args.fp8_kernel, dtype=args.dtype, attn_impl=args.attn_impl,
                      eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
    if launched_by_torchrun():
        return _train_across_processes(args, cfg)
    if (args.pp, args.ep, args.dp) != (1, 1, 1):
        raise CliError("--pp/--ep/--dp split training over processes: launch with torchrun --nproc-per-node N "
                       "-m dsv3ref train ... (N = pp x ep x dp)")
    allowed = tuple(name for group in args.allow_change for name in group)
    final = train(cfg, resume=args.resume, allow_changes=allowed)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
             if k in ("step", "loss", "mtp_loss", "val_loss", "val_maxvio", "tokens_per_second")}
    print(f"{shown}; checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


_positive = _integer(1)
_positive_float = _number(0.0, open_low=True)


def _torch_device(text: str) -> str:
    """argparse type: a device name torch knows (cpu, cuda, cuda:1, ...)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, found {text!r}") from None
    return text


def _field_list(text: str) -> list[str]:
    """argparse type of --allow-change: comma-separated TrainConfig fields that change a run's trajectory."""
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRAJECTORY_FIELDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(TRAJECTORY_FIELDS)}, found {text!r}")
    return names


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-path", default=None, help="checkpoint folder with tokenizer files (default: the "
                                                     "embedded untrained tiny model)")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--temperature", type=_number(0.0), default=0.0,
                   help="0: greedy; a temperature too small to tell tokens apart draws among the most likely")
    p.add_argument("--top-p", type=_number(0.0, open_low=True, high=1.0), default=1.0, help="1: off")
    p.add_argument("--top-k", type=_integer(0), default=0, help="0: off")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (one graph, captured once)")
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the MTP module (loaded only then)")
    p.add_argument("--cache", choices=("static", "paged"), default="static",
                   help="the KV cache: static, or the latent in 64-position pages read through the FlashMLA-shaped "
                        "op (needs --attn-impl absorb)")
    p.add_argument("--prefill-chunk", type=_positive, default=DEFAULT_PREFILL_CHUNK,
                   help="tokens one prefill pass takes at most (bounds its memory; the text does not change)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="one process: where it runs (auto: cuda when there is one); under torchrun each rank takes "
                        "its GPU, or the CPU")
    p.add_argument("--max-memory-gib", type=_positive_float, default=None,
                   help="memory a rank may use (default: what its GPU has free, or the machine's available memory "
                        "shared by its processes); a launch that needs more stops before loading")
    _impl_args(p)


def _impl_args(p: argparse.ArgumentParser) -> None:
    """How the model computes: the names of dsv3ref.impl, as flags."""
    g = p.add_argument_group("implementation (see dsv3ref.impl; every choice gives the same result)")
    g.add_argument("--attn-impl", choices=CHOICES["attn_impl"], default="absorb")
    g.add_argument("--attn-order", choices=CHOICES["attn_order"], default="auto", help="for --attn-impl absorb")
    g.add_argument("--moe-impl", choices=(AUTO, *CHOICES["moe_impl"]), default=AUTO,
                   help="auto: grouped (loop with FP8 GEMMs)")
    g.add_argument("--gemm-impl", choices=(AUTO, *CHOICES["gemm_impl"]), default=AUTO,
                   help="auto: the checkpoint's own format (an FP8 checkpoint runs FP8 GEMMs); bf16: dequantize on "
                        "load")
    g.add_argument("--fp8-kernel", choices=(AUTO, *CHOICES["fp8_kernel"]), default=AUTO,
                   help="auto: torch's blockwise scaled_mm where the GPU runs it (SM90, CUDA >= 12.9), else the "
                        "exact emulation")
    g.add_argument("--dtype", choices=list(DTYPES), default=AUTO,
                   help="weights (but FP8), activations, cache and exchanges; auto: bfloat16 on CUDA, float32 on a "
                        "CPU (router scores and bias, norm statistics and softmax stay float32)")
    g = p.add_argument_group("parallel (under torchrun; see dsv3ref.parallel)")
    g.add_argument("--layout", choices=CHOICES["layout"], default="tp",
                   help="tp: heads, FFNs, vocabulary and experts split; dp: data-parallel attention, experts split")
    g.add_argument("--moe-comm", choices=CHOICES["moe_comm"], default="allreduce",
                   help="how tokens meet the routed experts on other ranks")
    g.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                   help="seconds before a collective of generation fails (a dead rank)")
    g.add_argument("--load-timeout", type=_positive_float, default=DEFAULT_LOAD_TIMEOUT_S,
                   help="seconds the ranks wait for each other at the start and after loading (a slow disk)")


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (its subcommands and flags)."""
    parser = argparse.ArgumentParser(prog="python -m dsv3ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the embedded tiny model end to end")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=demo)
    p = sub.add_parser("generate", help="generate a reply to one prompt, streaming it")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    _sampling_args(p)
    p.set_defaults(func=generate_cmd)
    p = sub.add_parser("chat", help="interactive chat with history (reads stdin)")
    p.add_argument("--system", default=None, help="a system prompt")
    _sampling_args(p)
    p.set_defaults(func=chat_cmd)
    p = sub.add_parser("compare", help="trace dsv3ref and another implementation on a checkpoint, find the first "
                                       "divergence")
    p.add_argument("ckpt", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("--against", choices=["hf", "fast"], default="hf",
                   help="hf: transformers' DeepseekV3ForCausalLM; fast: dsv3ref's absorb + grouped path")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seq-len", type=_positive, default=16)
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--rtol", type=_number(0.0), default=1e-5)
    p.add_argument("--atol", type=_number(0.0), default=0.0)
    p.set_defaults(func=compare_cmd)
    p = sub.add_parser("plan", help="per-GPU memory of the full model: weights, latent cache, what fits")
    p.add_argument("--config", default="deepseek-v3", help="'deepseek-v3' or a checkpoint folder's config.json")
    p.add_argument("--world-size", type=_positive, default=None, help="GPUs (default: the usual machines)")
    p.add_argument("--layout", choices=CHOICES["layout"], default=None, help="default: both (table), tp (one plan)")
    p.add_argument("--moe-comm", choices=CHOICES["moe_comm"], default=None,
                   help="default: allreduce with tp, alltoall with dp")
    p.add_argument("--gemm-impl", choices=CHOICES["gemm_impl"], default=None,
                   help="default: each machine's (table), fp8 (one plan)")
    p.add_argument("--dtype", choices=list(DTYPES), default=AUTO, help="auto: bfloat16, as on the GPUs")
    p.add_argument("--gpu-memory-gib", type=_positive_float, default=None,
                   help="memory of one GPU (default: an H200's 140.4 GiB with --world-size; the usual machines' "
                        "without, or nodes of 8 GPUs of this memory)")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--seq-len", type=_positive, default=4096)
    p.add_argument("--prefill-chunk", type=_positive, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--mtp", action="store_true", help="the MTP module loaded (speculative decoding)")
    p.add_argument("--simulate", action="store_true",
                   help="also run the launch's code for rank 0 on fake tensors and show what it allocates "
                        "(about a minute for the full model)")
    p.set_defaults(func=plan_cmd)
    p = sub.add_parser("train", help="train a small DeepSeek-V3 on the Python standard library's source (bytes)")
    p.add_argument("--out-dir", default="runs/train", help="checkpoints (step_NNNNNN/) and metrics.jsonl")
    p.add_argument("--steps", type=_positive, default=600)
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--lr", type=_number(0.0, open_low=True), default=3e-3,
                   help="peak learning rate (cosine down to a tenth)")
    p.add_argument("--warmup", type=_integer(0), default=30, help="steps of linear warmup")
    p.add_argument("--mtp-lambda", type=_number(0.0), default=0.3,
                   help="weight of the MTP loss (report: 0.3, then 0.1)")
    p.add_argument("--mtp-lambda-late", type=_number(0.0), default=None,
                   help="MTP weight for the last 32%% of the steps (report: 0.1 after 10T of 14.8T tokens); "
                        "default: --mtp-lambda throughout")
    p.add_argument("--device", type=_torch_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--balance", choices=["bias", "aux", "none"], default="bias",
                   help="bias: auxiliary-loss-free bias update; aux: a classic auxiliary loss; none")
    p.add_argument("--gamma", type=_number(0.0), default=0.001, help="bias update speed (report: 0.001)")
    p.add_argument("--gamma-late", type=_number(0.0), default=None,
                   help="bias update speed for the last 3.4%% of the steps (report: 0 for the last 500B of 14.8T "
                        "tokens); default: --gamma throughout")
    p.add_argument("--seq-alpha", type=_number(0.0), default=0.0,
                   help="sequence-wise balance loss weight (report: 1e-4)")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs in forward and backward (section 3.3, emulated)")
    p.add_argument("--fp8-kernel", choices=list(TRAINING_KERNELS), default="emulate",
                   help="with --fp8: emulate (the exact block-scaled GEMMs) or dequantize (the same FP8 operands "
                        "in one float32 GEMM each: float32 rounding apart, the same result, faster)")
    p.add_argument("--eval-every", type=_positive, default=100)
    p.add_argument("--save-every", type=_integer(0), default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--seed", type=_integer(0, 2**32), default=0)
    p.add_argument("--resume", default=None, help="a step_NNNNNN/ checkpoint folder of this run to continue from "
                                                  "(the run's settings must equal the saved ones)")
    p.add_argument("--allow-change", type=_field_list, action="append", default=[], metavar="FIELD[,FIELD]",
                   help="with --resume: settings allowed to differ from the checkpoint's (e.g. steps, to train "
                        "longer); the resumed run then no longer equals the uninterrupted one")
    p.add_argument("--dtype", choices=list(TRAIN_DTYPES), default="float32",
                   help="weights and activations (float64: the oracle the distributed trainer is tested against)")
    p.add_argument("--attn-impl", choices=list(CHOICES["attn_impl"]), default="naive",
                   help="attention: naive (readable) or absorb (torch's fused attention kernel for training "
                        "chunks: the same gradients to float rounding, a faster step; single process only)")
    across = p.add_argument_group("across processes (under torchrun; the report's section 3.2)")
    across.add_argument("--pp", type=_positive, default=1, help="pipeline ranks")
    across.add_argument("--ep", type=_positive, default=1,
                        help="expert-parallel ranks (reading different tokens, as data-parallel ranks do)")
    across.add_argument("--dp", type=_positive, default=1, help="data-parallel replicas (ZeRO-1 optimizer state)")
    across.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b",
                        help="pipeline schedule of torch.distributed.pipelining (zbv, dualpipev: two stages per "
                             "rank in a V, embedding and head on rank 0)")
    across.add_argument("--microbatches", type=_positive, default=4, help="micro-batches per data shard per step")
    across.add_argument("--timeout", type=_number(0.0, open_low=True), default=300.0,
                        help="seconds before a collective that does not complete fails")
    p.set_defaults(func=train_cmd)
    return parser


def _train_across_processes(args: argparse.Namespace, cfg: TrainConfig) -> int:
    """`train` under torchrun: every rank trains its part; rank 0 prints."""
    if args.allow_change:
        raise CliError("--allow-change: a distributed run resumes only with the saved settings")
    layout = Layout(pp=args.pp, ep=args.ep, dp=args.dp, schedule=args.schedule, microbatches=args.microbatches)
    rank, world, _ = init_from_env(args.timeout, device="cuda" if cfg.device.startswith("cuda") else "cpu")
    if rank == 0:
        print(f"rank 0 of {world}: pp {layout.pp} x ep {layout.ep} x dp {layout.dp}, schedule {layout.schedule}, "
              f"{layout.microbatches} micro-batches per data shard", file=sys.stderr)
    final = train_distributed(cfg, layout, resume=args.resume, timeout=datetime.timedelta(seconds=args.timeout))
    if rank == 0:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
                 if k in ("step", "loss", "mtp_loss", "tokens_per_second")}
        print(f"{shown}; checkpoints (one file per rank) and metrics.jsonl in {cfg.out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        told = describe_failure(e)  # out of memory, torch.compile, a collective; None: a bug (traceback)
        if told is None:
            raise
        print(f"error: {told[0]}", file=sys.stderr)
        return told[1]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
