"""The report's three training claims, measured at small scale (dsv3ref.train).

    .venv/bin/python experiments/train_claims.py [--steps 300] [--only balance mtp fp8]

1. Load balance: the same model trained with the auxiliary-loss-free bias update (gamma = 0.001, and
   0.01), with a classic auxiliary loss (alpha = 0.01) and with neither: validation loss and MaxVio
   (max load / mean load - 1, on the validation batches, averaged over MoE layers) over training.
2. MTP: the main model's validation loss trained with and without the MTP objective (lambda 0.3
   and 0) at equal steps; the MTP draft's acceptance rate in greedy self-speculative decoding on
   held-out text, against the untrained model's.
3. FP8 against float32 training: the relative difference of the final loss curves, against float32's own
   seed-to-seed spread.

Every run is repeated for each of --seeds (initialization and batches), so each claim is read as a
mean with its spread over seeds; a difference between two settings is taken seed by seed (paired).
Each writes experiments/results/<name>.json and a figure experiments/results/<name>.png; the
numbers are copied into docs/training.md. Every run uses one thread, --jobs of them at once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
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


# name -> changes to TrainConfig; every one is trained once per seed (the seed sets the initialization and
# every batch, so two runs of one seed differ only by the change)
RUNS = {
    "balance_bias": {"balance": "bias"},
    "balance_aux": {"balance": "aux"},
    "balance_none": {"balance": "none"},
    # gamma = 0.001 moves a bias by at most 0.3 in 300 steps; the same rule ten times faster shows where it is
    # heading (the report trains for hundreds of thousands of steps)
    "balance_bias_fast": {"balance": "bias", "gamma": 0.01},
    "mtp_off": {"mtp_lambda": 0.0},
    "fp8": {"fp8": True},
}
NEEDS = {"balance": ("balance_bias", "balance_aux", "balance_none", "balance_bias_fast"),
         "mtp": ("balance_bias", "mtp_off"), "fp8": ("balance_bias", "fp8")}


def folder(name: str, seed: int) -> Path:
    return RESULTS / "runs" / f"{name}_seed{seed}"


def train_one(name: str, seed: int, steps: int) -> str:
    """Train one run (or reuse a finished one: results/runs/ is a cache, not committed); one thread."""
    torch.set_num_threads(1)
    cfg = TrainConfig(out_dir=str(folder(name, seed)), steps=steps, eval_every=max(steps // 10, 1), seed=seed,
                      progress=False, **RUNS[name])
    if not (Path(cfg.out_dir) / f"step_{steps:06d}").exists():
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # an unfinished run of this cache: train refuses to overwrite it
        train(cfg, corpus=Corpus.stdlib(cfg.max_corpus_bytes))
    return f"{name} seed {seed}"


def train_all(names: set[str], seeds: list[int], steps: int, jobs: int) -> None:
    """Every (run, seed), `jobs` at a time; the slow FP8 runs first so the pool ends together."""
    todo = sorted(((n, s) for n in names for s in seeds), key=lambda job: (job[0] != "fp8", job))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in as_completed([pool.submit(train_one, n, s, steps) for n, s in todo]):
            print("trained", done.result(), flush=True)


def stats(values: list[float]) -> dict:
    """Mean, sample standard deviation, range and the values themselves (one per seed)."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "values": values}


def evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "val_loss" in r]


def tail_loss(rows: list[dict]) -> float:
    """Training loss averaged over the last 10% of steps (single steps are noisy)."""
    tail = max(len(rows) // 10, 1)
    return sum(r["loss"] for r in rows[-tail:]) / tail


def acceptance(checkpoint: Path, corpus: Corpus, prompts: int = 6, new: int = 48) -> dict:
    """Greedy self-speculative decoding on held-out text: acceptance rate and equality with plain greedy."""
    model = DeepseekV3.from_pretrained(checkpoint)
    out = {}
    for label, m in (("trained", model), ("untrained", DeepseekV3(model.config).eval())):
        ids = [batch(corpus.validation, 1, 64, seed=99, step=i)[0].tolist() for i in range(prompts)]
        plain = generate(m, ids, new, eos_token_id=[])
        spec = generate(m, ids, new, eos_token_id=[], speculative=True)
        out[label] = {"acceptance_rate": spec.stats["acceptance_rate"],
                      "tokens_per_forward": spec.stats["tokens_per_forward"],
                      "same_tokens_as_greedy": spec.tokens == plain.tokens}
    return out


def band(ax, curves: list[list[tuple]], column: int, label: str) -> None:
    """The mean over seeds as a line, their range as a shaded band."""
    steps_ = [row[0] for row in curves[0]]
    values = [[curve[i][column] for curve in curves] for i in range(len(steps_))]
    line, = ax.plot(steps_, [sum(v) / len(v) for v in values], marker="o", ms=3, label=label)
    ax.fill_between(steps_, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)


LABELS = {"balance_bias": "bias, gamma 0.001", "balance_aux": "aux loss, alpha 0.01", "balance_none": "none",
          "balance_bias_fast": "bias, gamma 0.01"}


def balance(steps: int, seeds: list[int], corpus: Corpus) -> dict:
    runs = {}
    for name, label in LABELS.items():
        per_seed = {}
        for seed in seeds:
            ev = evals(metrics(folder(name, seed)))
            per_seed[seed] = {"final_val_loss": ev[-1]["val_loss"], "final_val_maxvio": ev[-1]["val_maxvio"],
                              "mean_val_maxvio": sum(e["val_maxvio"] for e in ev) / len(ev),
                              "curve": [(e["step"], e["val_loss"], e["val_maxvio"]) for e in ev]}
        runs[label] = {"seeds": per_seed, **{k: stats([per_seed[s][k] for s in seeds]) for k in
                                             ("final_val_loss", "final_val_maxvio", "mean_val_maxvio")}}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, r in runs.items():
        curves = [r["seeds"][s]["curve"] for s in seeds]
        band(a, curves, 2, label)
        band(b, curves, 1, label)
    a.set(xlabel="step", ylabel="validation MaxVio", title=f"Load balance ({len(seeds)} seeds: mean and range)")
    b.set(xlabel="step", ylabel="validation loss (nats/byte)", title="Validation loss")
    a.legend(fontsize=8)
    plt.tight_layout()
    fig.savefig(RESULTS / "balance.png", dpi=100)
    return {"runs": runs}


def mtp(steps: int, seeds: list[int], corpus: Corpus) -> dict:
    per_seed = {}
    for seed in seeds:
        with_, without = evals(metrics(folder("balance_bias", seed))), evals(metrics(folder("mtp_off", seed)))
        per_seed[seed] = {"with_mtp_final_val_loss": with_[-1]["val_loss"],
                          "without_mtp_final_val_loss": without[-1]["val_loss"],
                          "curves": {"with": [(e["step"], e["val_loss"]) for e in with_],
                                     "without": [(e["step"], e["val_loss"]) for e in without]},
                          "speculative": acceptance(folder("balance_bias", seed) / f"step_{steps:06d}", corpus)}
        per_seed[seed]["relative_gain"] = 1 - per_seed[seed]["with_mtp_final_val_loss"] / per_seed[seed][
            "without_mtp_final_val_loss"]
    result = {"seeds": per_seed}
    for key in ("with_mtp_final_val_loss", "without_mtp_final_val_loss", "relative_gain"):
        result[key] = stats([per_seed[s][key] for s in seeds])
    result["acceptance_rate"] = stats([per_seed[s]["speculative"]["trained"]["acceptance_rate"] for s in seeds])
    result["untrained_acceptance_rate"] = stats([per_seed[s]["speculative"]["untrained"]["acceptance_rate"]
                                                 for s in seeds])
    result["same_tokens_as_greedy"] = all(per_seed[s]["speculative"][m]["same_tokens_as_greedy"]
                                          for s in seeds for m in ("trained", "untrained"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("with", "without"):
        band(ax, [per_seed[s]["curves"][key] for s in seeds], 1, f"{key} MTP")
    ax.set(xlabel="step", ylabel="main model validation loss", title=f"MTP objective ({len(seeds)} seeds)")
    ax.legend()
    plt.tight_layout()
    fig.savefig(RESULTS / "mtp.png", dpi=100)
    return result


def fp8(steps: int, seeds: list[int], corpus: Corpus) -> dict:
    per_seed = {}
    for seed in seeds:
        f32, low = metrics(folder("balance_bias", seed)), metrics(folder("fp8", seed))
        a, b = tail_loss(f32), tail_loss(low)
        per_seed[seed] = {"final_train_loss_f32": a, "final_train_loss_fp8": b, "relative_difference": (b - a) / a,
                          "final_val_loss_f32": evals(f32)[-1]["val_loss"],
                          "final_val_loss_fp8": evals(low)[-1]["val_loss"],
                          "train_f32": [r["loss"] for r in f32], "train_fp8": [r["loss"] for r in low]}
    result = {"seeds": {s: {k: v for k, v in r.items() if not k.startswith("train_")} for s, r in per_seed.items()}}
    for key in ("final_train_loss_f32", "final_train_loss_fp8", "relative_difference"):
        result[key] = stats([per_seed[s][key] for s in seeds])
    # float32 training's own noise: the relative differences between the float32 runs of two seeds
    f32 = [per_seed[s]["final_train_loss_f32"] for s in seeds]
    result["float32_seed_to_seed"] = stats([(x - y) / y for i, x in enumerate(f32) for y in f32[:i]])
    result["layer_errors"] = layer_errors(folder("balance_bias", seeds[0]) / f"step_{steps:06d}", corpus)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("train_f32", "float32"), ("train_fp8", "FP8 GEMMs (emulated)")):
        band(ax, [list(enumerate(per_seed[s][key], 1)) for s in seeds], 1, label)
    ax.set(xlabel="step", ylabel="training loss", title=f"FP8 against float32 training ({len(seeds)} seeds)",
           yscale="log")
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
        fwd[name] = float((y.detach().double() - ref).norm() / ref.norm())
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once, one thread each")
    parser.add_argument("--only", nargs="+", default=["balance", "mtp", "fp8"], choices=["balance", "mtp", "fp8"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    train_all({n for name in args.only for n in NEEDS[name]}, args.seeds, args.steps, args.jobs)
    corpus = Corpus.stdlib(TrainConfig().max_corpus_bytes)
    for name in args.only:
        result = {"steps": args.steps, "seeds_trained": args.seeds,
                  **{"balance": balance, "mtp": mtp, "fp8": fp8}[name](args.steps, args.seeds, corpus)}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(name, "written", flush=True)


if __name__ == "__main__":
    main()
