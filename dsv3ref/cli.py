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
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dsv3ref import DeepseekV3, ModelConfig, count_parameters, generate, save_pretrained
from dsv3ref.impl import CHOICES, Implementation
from dsv3ref.oracle import compare, trace, trace_hf
from dsv3ref.parallel import Parallel, ParallelError, from_pretrained, parallelize
from dsv3ref.parallel.launch import LaunchError, generate_data_parallel, init_from_env, launched_by_torchrun
from dsv3ref.parallel.planner import format_table, machine_table, plan
from dsv3ref.tokenizer import StreamDecoder, Tokenizer
from dsv3ref.train import TrainConfig, train

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


def implementation(args: argparse.Namespace) -> Implementation:
    """The --attn-impl ... --fp8-kernel flags as an Implementation (defaults: the fast paths)."""
    moe_impl = args.moe_impl or ("loop" if args.gemm_impl == "fp8" else "grouped")
    return Implementation(attn_impl=args.attn_impl, attn_order=args.attn_order, moe_impl=moe_impl,
                          gemm_impl=args.gemm_impl, fp8_kernel=args.fp8_kernel)


def load_for_text(ckpt_path: str | None, seed: int = 0, impl: Implementation | None = None,
                  parallel: Parallel | None = None, device: str | torch.device = "cpu"
                  ) -> tuple[DeepseekV3, Tokenizer, str]:
    """The model and tokenizer of a checkpoint folder, or the embedded default. parallel: split the
    model over the default process group (each rank reads only its part of the checkpoint)."""
    impl = impl or Implementation(attn_impl="absorb", moe_impl="grouped")
    if ckpt_path is None:
        tokenizer = Tokenizer.from_pretrained()
        cfg = ModelConfig.preset("tiny").replace(vocab_size=ModelConfig.preset("deepseek-v3").vocab_size)
        torch.manual_seed(seed)
        model = DeepseekV3(cfg, impl=impl).eval()
        if parallel is not None:
            parallelize(model, parallel=parallel)
        return model.to(device), tokenizer, UNTRAINED
    path = Path(ckpt_path)
    if not path.is_dir():
        raise CliError(f"--ckpt-path {path}: no such checkpoint folder")
    try:
        tokenizer = Tokenizer.from_pretrained(path)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None
    if parallel is not None:
        model = from_pretrained(path, parallel=parallel, device=device, **dataclasses.asdict(impl))
    else:
        model = DeepseekV3.from_pretrained(path, device=device, **dataclasses.asdict(impl))
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
                   eos_token_id=tokenizer.eos_token_id, seed=args.seed, compile=getattr(args, "compile", False))
    if model.parallel is not None and model.parallel.parallel.layout == "dp":  # all ranks step together
        tokens = generate_data_parallel(model, [ids], args.max_new_tokens, **options).tokens[0]
        out.write(tokenizer.decode(tokens, skip_special_tokens=True))
    else:
        tokens = generate(model, [ids], args.max_new_tokens, stream=stream, **options).tokens[0]
    out.write("\n")
    return tokens


def _text_model(args: argparse.Namespace) -> tuple[DeepseekV3, Tokenizer, str, bool]:
    """The model of generate/chat: on one process, or split over torchrun's processes (then joined
    into a process group first). Returns (model, tokenizer, label, whether this rank prints)."""
    if not launched_by_torchrun():
        if args.layout != "tp" or args.moe_comm != "allreduce":
            raise CliError("--layout/--moe-comm choose how the model is split over processes: launch with "
                           "torchrun --nproc-per-node N -m dsv3ref ...")
        return (*load_for_text(args.ckpt_path, args.seed, implementation(args)), True)
    rank, world, device = init_from_env(args.timeout)
    try:
        model, tokenizer, label = load_for_text(args.ckpt_path, args.seed, implementation(args),
                                                Parallel(args.layout, args.moe_comm), device)
    except ParallelError as e:
        raise CliError(f"world size {world} does not fit this model: {e}") from None
    return model, tokenizer, f"{label}; rank {rank} of {world}, layout {args.layout}, {args.moe_comm}", rank == 0


def generate_cmd(args: argparse.Namespace) -> int:
    model, tokenizer, label, speaks = _text_model(args)
    out = sys.stdout if speaks else io.StringIO()
    if speaks:
        print(f"[{label}]", file=sys.stderr)
    ids = _prompt_ids(tokenizer, [{"role": "user", "content": args.prompt}], args.raw)
    _reply(model, tokenizer, ids, args, out)
    return 0


def _read_line(speaks: bool) -> str:
    """A line of stdin, read by rank 0 and sent to the other ranks (all of them generate together)."""
    line = sys.stdin.readline() if speaks else ""
    if dist.is_initialized():
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def chat_cmd(args: argparse.Namespace) -> int:
    model, tokenizer, label, speaks = _text_model(args)
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
    """Print the per-GPU memory plan of a configuration (default: the released DeepSeek-V3)."""
    cfg = (ModelConfig.preset("deepseek-v3") if args.config == "deepseek-v3"
           else ModelConfig.from_pretrained(Path(args.config)))
    if args.world_size is None:
        print(f"DeepSeek-V3 per GPU, batch {args.batch_size} x {args.seq_len} tokens of latent cache (BF16), "
              f"main model without MTP; reserve 3 GiB per GPU")
        print(format_table(machine_table(cfg, args.batch_size, args.seq_len)))
        return 0
    p = plan(cfg, args.world_size, args.layout, args.gemm_impl, args.gpu_memory_gib, args.batch_size, args.seq_len)
    gb = 1e9
    print(f"world size {p.world_size}, layout {p.layout}, gemm_impl {p.gemm_impl}, batch {p.batch_size} x "
          f"{p.seq_len} tokens, GPU {p.gpu_memory / gb:.1f} GB")
    print(f"  weights      {p.weights / gb:9.2f} GB  (the largest rank's, exact)")
    print(f"  latent cache {p.cache / gb:9.2f} GB")
    print(f"  activations  {p.activations / gb:9.2f} GB  (estimate of a prefill chunk's peak)")
    print(f"  reserve      {p.reserve / gb:9.2f} GB")
    print(f"  cache tokens that fit: {p.cache_tokens_fit:,} per GPU, {p.total_tokens_fit:,} in all")
    print(f"  fits: {'yes' if p.fits else 'NO'}")
    return 0 if p.fits else 1


def train_cmd(args: argparse.Namespace) -> int:
    """Train the small model on the standard library's bytes (dsv3ref.train); print the final metrics."""
    cfg = TrainConfig(out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup, mtp_lambda=args.mtp_lambda,
                      mtp_lambda_late=args.mtp_lambda_late, device=args.device,
                      balance=args.balance, gamma=args.gamma, seq_alpha=args.seq_alpha, fp8=args.fp8,
                      eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
    if args.resume is not None and not (Path(args.resume) / "train_state.json").is_file():
        raise CliError(f"--resume {args.resume}: not a training checkpoint (no train_state.json)")
    final = train(cfg, resume=args.resume)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()
             if k in ("step", "loss", "mtp_loss", "val_loss", "val_maxvio", "tokens_per_second")}
    print(f"{shown}; checkpoints and metrics.jsonl in {cfg.out_dir}")
    return 0


def _positive(text: str) -> int:
    """argparse type: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-path", default=None, help="checkpoint folder with tokenizer files (default: the "
                                                     "embedded untrained tiny model)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--compile", action="store_true", help="decode through torch.compile (one graph, captured once)")
    _impl_args(p)


def _impl_args(p: argparse.ArgumentParser) -> None:
    """How the model computes: the names of dsv3ref.impl, as flags."""
    g = p.add_argument_group("implementation (see dsv3ref.impl; every choice gives the same result)")
    g.add_argument("--attn-impl", choices=CHOICES["attn_impl"], default="absorb")
    g.add_argument("--attn-order", choices=CHOICES["attn_order"], default="auto", help="for --attn-impl absorb")
    g.add_argument("--moe-impl", choices=CHOICES["moe_impl"], default=None,
                   help="default: grouped (loop with --gemm-impl fp8)")
    g.add_argument("--gemm-impl", choices=CHOICES["gemm_impl"], default="bf16",
                   help="fp8: keep an FP8 checkpoint's weights in FP8")
    g.add_argument("--fp8-kernel", choices=CHOICES["fp8_kernel"], default="emulate", help="for --gemm-impl fp8")
    g = p.add_argument_group("parallel (under torchrun; see dsv3ref.parallel)")
    g.add_argument("--layout", choices=CHOICES["layout"], default="tp",
                   help="tp: heads, FFNs, vocabulary and experts split; dp: data-parallel attention, experts split")
    g.add_argument("--moe-comm", choices=CHOICES["moe_comm"], default="allreduce",
                   help="how tokens meet the routed experts on other ranks")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds before a collective fails (a dead rank)")


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
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=0.0)
    p.set_defaults(func=compare_cmd)
    p = sub.add_parser("plan", help="per-GPU memory of the full model: weights, latent cache, what fits")
    p.add_argument("--config", default="deepseek-v3", help="'deepseek-v3' or a checkpoint folder's config.json")
    p.add_argument("--world-size", type=_positive, default=None, help="GPUs (default: the usual machines)")
    p.add_argument("--layout", choices=CHOICES["layout"], default="tp")
    p.add_argument("--gemm-impl", choices=CHOICES["gemm_impl"], default="fp8")
    p.add_argument("--gpu-memory-gib", type=float, default=143_771 / 1024, help="default: an H200's 140.4 GiB")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--seq-len", type=_positive, default=4096)
    p.set_defaults(func=plan_cmd)
    p = sub.add_parser("train", help="train a small DeepSeek-V3 on the Python standard library's source (bytes)")
    p.add_argument("--out-dir", default="runs/train", help="checkpoints (step_NNNNNN/) and metrics.jsonl")
    p.add_argument("--steps", type=_positive, default=600)
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--seq-len", type=_positive, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine down to a tenth)")
    p.add_argument("--warmup", type=_positive, default=30)
    p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight of the MTP loss (report: 0.3, then 0.1)")
    p.add_argument("--mtp-lambda-late", type=float, default=None,
                   help="MTP weight for the last third of the steps (report: 0.1); default: --mtp-lambda throughout")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--balance", choices=["bias", "aux", "none"], default="bias",
                   help="bias: auxiliary-loss-free bias update; aux: a classic auxiliary loss; none")
    p.add_argument("--gamma", type=float, default=0.001, help="bias update speed (report: 0.001)")
    p.add_argument("--seq-alpha", type=float, default=0.0, help="sequence-wise balance loss weight (report: 1e-4)")
    p.add_argument("--fp8", action="store_true", help="FP8 GEMMs in forward and backward (section 3.3, emulated)")
    p.add_argument("--eval-every", type=_positive, default=100)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--resume", default=None, help="a step_NNNNNN/ checkpoint folder of this run to continue from")
    p.set_defaults(func=train_cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # under torchrun: another rank died (gloo: peer closed), or a collective timed out
        if not dist.is_initialized():
            raise
        print(f"error: rank {dist.get_rank() if dist.is_initialized() else '?'}: a collective failed (another rank "
              f"exited, or --timeout passed): {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
