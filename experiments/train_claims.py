"""The report's three training claims, measured at small scale (dsv3ref.train).

    .venv/bin/python experiments/train_claims.py [--steps 300] [--only balance mtp fp8]

1. Load balance: the same model trained with the auxiliary-loss-free bias update (gamma = 0.001, and
   0.01), with a classic auxiliary loss (alpha = 0.01) and with neither: validation loss and MaxVio
   (max load / mean load - 1, on the validation batches, averaged over MoE layers) over training.
2. MTP: the main model's validation loss trained with and without the MTP objective (lambda 0.3
   and 0) at equal steps; the MTP draft's acceptance rate in greedy self-speculative decoding on
   held-out text, against the untrained model's.
3. FP8 against float32 training: the relative difference of the final loss curves.

Each writes experiments/results/<name>.json and a figure experiments/results/<name>.png; the
numbers are copied into docs/training.md. Every run uses one thread (two runs can share 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dsv3ref import DeepseekV3, generate  # noqa: E402
from dsv3ref.fp8 import FP8_WEIGHT  # noqa: E402
from dsv3ref.train import Corpus, FP8LinearFunction, TrainConfig, train  # noqa: E402
from dsv3ref.train.data import batch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def run(name: str, steps: int, corpus: Corpus, **changes) -> list[dict]:
    """Train (or reuse a finished run of the same name: results/runs/ is a cache, not committed)."""
    cfg = TrainConfig(out_dir=str(RESULTS / "runs" / name), steps=steps, eval_every=max(steps // 10, 1),
                      progress=False, **changes)
    if not (Path(cfg.out_dir) / f"step_{steps:06d}").exists():
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # an unfinished run of this cache: train refuses to overwrite it
        train(cfg, corpus=corpus)
    return metrics(Path(cfg.out_dir))


def evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "val_loss" in r]


def acceptance(folder: Path, corpus: Corpus, prompts: int = 6, new: int = 48) -> dict:
    """Greedy self-speculative decoding on held-out text: acceptance rate and equality with plain greedy."""
    model = DeepseekV3.from_pretrained(folder)
    out = {}
    for label, m in (("trained", model), ("untrained", DeepseekV3(model.config).eval())):
        ids = [batch(corpus.validation, 1, 64, seed=99, step=i)[0].tolist() for i in range(prompts)]
        plain = generate(m, ids, new, eos_token_id=[])
        spec = generate(m, ids, new, eos_token_id=[], speculative=True)
        out[label] = {"acceptance_rate": spec.stats["acceptance_rate"],
                      "tokens_per_forward": spec.stats["tokens_per_forward"],
                      "same_tokens_as_greedy": spec.tokens == plain.tokens}
    return out


def balance(steps: int, corpus: Corpus) -> dict:
    runs = {b: run(f"balance_{b}", steps, corpus, balance=b) for b in ("bias", "aux", "none")}
    # gamma = 0.001 moves a bias by at most 0.3 in 300 steps; the same rule ten times faster shows where
    # it is heading (the report trains for hundreds of thousands of steps)
    runs["bias, gamma 0.01"] = run("balance_bias_fast", steps, corpus, balance="bias", gamma=0.01)
    result = {b: {"final_val_loss": evals(r)[-1]["val_loss"], "final_val_maxvio": evals(r)[-1]["val_maxvio"],
                  "mean_val_maxvio": sum(e["val_maxvio"] for e in evals(r)) / len(evals(r)),
                  "curve": [(e["step"], e["val_loss"], e["val_maxvio"]) for e in evals(r)]} for b, r in runs.items()}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in result.items():
        steps_, loss, vio = zip(*r["curve"], strict=True)
        a.plot(steps_, vio, marker="o", label=name)
        b.plot(steps_, loss, marker="o", label=name)
    a.set(xlabel="step", ylabel="validation MaxVio", title="Load balance")
    b.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    a.legend()
    plt.tight_layout()
    fig.savefig(RESULTS / "balance.png", dpi=100)
    return result


def mtp(steps: int, corpus: Corpus) -> dict:
    with_mtp = run("balance_bias", steps, corpus)  # the balance experiment's run (reused when finished)
    without = run("mtp_off", steps, corpus, mtp_lambda=0.0)
    result = {"with_mtp_final_val_loss": evals(with_mtp)[-1]["val_loss"],
              "without_mtp_final_val_loss": evals(without)[-1]["val_loss"],
              "speculative": acceptance(RESULTS / "runs" / "balance_bias" / f"step_{steps:06d}", corpus),
              "curves": {"with": [(e["step"], e["val_loss"]) for e in evals(with_mtp)],
                         "without": [(e["step"], e["val_loss"]) for e in evals(without)]}}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in result["curves"].items():
        ax.plot(*zip(*curve, strict=True), marker="o", label=f"{name} MTP")
    ax.set(xlabel="step", ylabel="main model validation loss", title="MTP objective")
    ax.legend()
    plt.tight_layout()
    fig.savefig(RESULTS / "mtp.png", dpi=100)
    return result


def fp8(steps: int, corpus: Corpus) -> dict:
    f32 = run("fp8_baseline_f32", steps, corpus)  # the balance_bias run again: its own, so both can run at once
    low = run("fp8", steps, corpus, fp8=True)
    train_f32 = [r["loss"] for r in f32]
    train_fp8 = [r["loss"] for r in low]
    tail = max(len(train_f32) // 10, 1)  # the last 10% of steps, averaged: single steps are noisy
    a, b = sum(train_f32[-tail:]) / tail, sum(train_fp8[-tail:]) / tail
    result = {"final_train_loss_f32": a, "final_train_loss_fp8": b, "relative_difference": (b - a) / a,
              "final_val_loss_f32": evals(f32)[-1]["val_loss"], "final_val_loss_fp8": evals(low)[-1]["val_loss"]}
    result["val_relative_difference"] = (result["final_val_loss_fp8"] - result["final_val_loss_f32"]) / result[
        "final_val_loss_f32"]
    # the run-to-run noise of float32 training itself: another seed (initialization and batches)
    other = [r["loss"] for r in run("fp8_baseline_f32_seed1", steps, corpus, seed=1)]
    c = sum(other[-tail:]) / tail
    result["float32_seed_to_seed_relative_difference"] = (c - a) / a
    result["layer_errors"] = layer_errors(RESULTS / "runs" / "fp8_baseline_f32" / f"step_{steps:06d}", corpus)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(train_f32, label="float32", alpha=0.8)
    ax.plot(train_fp8, label="FP8 GEMMs (emulated)", alpha=0.8)
    ax.set(xlabel="step", ylabel="training loss", title="FP8 against float32 training", yscale="log")
    ax.legend()
    plt.tight_layout()
    fig.savefig(RESULTS / "fp8.png", dpi=100)
    return result


def layer_errors(folder: Path, corpus: Corpus) -> dict:
    """Where FP8's difference comes from: on the trained float32 model and one validation batch, each
    FP8-trained layer's forward output and weight gradient through FP8LinearFunction against float32."""
    model = DeepseekV3.from_pretrained(folder).train()
    inputs = {}
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and FP8_WEIGHT.search(f"{name}.weight")]
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in layers]
    model.loss(batch(corpus.validation, 8, 128, seed=5, step=0))
    for h in hooks:
        h.remove()
    fwd, grad = {}, {}
    for name, x in inputs.items():
        w = model.get_submodule(name).weight.detach()
        x = x.reshape(-1, x.shape[-1])
        xq = x.clone().requires_grad_()
        wq = w.clone().requires_grad_()
        y = FP8LinearFunction.apply(xq, wq)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
        y.backward(dy)
        ref = x.double() @ w.double().T
        fwd[name] = float((y.double() - ref).norm() / ref.norm())
        dw = dy.double().T @ x.double()
        grad[name] = float((wq.grad.double() - dw).norm() / dw.norm())
    kinds = {}
    for name in fwd:
        kind = name.rsplit(".", 1)[-1]
        kinds.setdefault(kind, []).append((fwd[name], grad[name]))
    return {"per_projection_mean": {k: {"forward": sum(f for f, _ in v) / len(v), "weight_grad": sum(g for _, g in v)
                                        / len(v)} for k, v in sorted(kinds.items())},
            "forward_max": max(fwd.values()), "weight_grad_max": max(grad.values()), "layers": len(fwd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="+", default=["balance", "mtp", "fp8"], choices=["balance", "mtp", "fp8"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.stdlib(TrainConfig().max_corpus_bytes)
    for name in args.only:
        result = {"balance": balance, "mtp": mtp, "fp8": fp8}[name](args.steps, corpus)
        result["steps"] = args.steps
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(name, json.dumps({k: v for k, v in result.items() if k not in ("curve", "curves")})[:600], flush=True)


if __name__ == "__main__":
    main()
