# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Training: the bias update, the MTP objective and FP8, measured
#
# *Lesson 9 of the dsv3ref course (lessons 00 to 11), after [08_scale_out](08_scale_out.ipynb) (many GPUs).*
#
# **What this notebook teaches.** Three of DeepSeek-V3's four ideas are about *training*: the
# auxiliary-loss-free balancing bias is updated between steps, Multi-Token Prediction is a training
# objective, and the FP8 framework is a mixed-precision training recipe. Every lesson so far ran
# random weights. Here we train a small DeepSeek-V3 (0.9M parameters, 16 experts, one MTP module) on
# the bytes of the Python standard library, live, for about a minute, with the report's schedules for
# the MTP weight lambda and the bias speed gamma scaled to its steps; watch its loss fall and its text
# become Python; check that self-speculative decoding with its trained MTP module gives exactly the
# greedy tokens and accepts far more drafts than an untrained model; and read the three experiments
# that test the report's claims at this scale (`experiments/train_claims.py`, three seeds each, run
# beforehand: half an hour on 2 cores is too long for a lesson), saying for each whether the claim is
# reproduced here, and why not where it is not.
#
# **What runs here, what is read.** Sections 1-3 train and decode live. Section 4 reads the numbers
# and figures `experiments/train_claims.py` wrote to `experiments/results/` (committed; rerun it to
# check them).
#
# Report sections: DeepSeek-V3 §2.1.2 (auxiliary-loss-free balancing), §2.2 (MTP), §3.3 (FP8
# training), §4.2 (hyper-parameters and their schedules).

# %%
STEPS = 200  # the knob: 200 steps take about a minute on a quiet 2-core machine; fewer for a quick look

# %%
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

import dsv3ref
from dsv3ref import DeepseekV3, generate
from dsv3ref.train import Corpus, TrainConfig, bias_speed, decode, encode, mtp_weight, train

torch.set_num_threads(2)
corpus = Corpus.stdlib(2_000_000)
print(f"corpus: {corpus.files[0]} training files ({corpus.train.numel():,} bytes), "
      f"{corpus.files[1]} validation files ({corpus.validation.numel():,} bytes)")
print(decode(corpus.validation[:300].tolist()))

# %% [markdown]
# ## 1. The schedules
#
# The report changes two of its training hyper-parameters late in pre-training (§4.2): the MTP loss
# weight lambda is 0.3 for the first 10T of the 14.8T tokens and 0.1 after; the bias update speed gamma
# is 0.001 for the first 14.3T tokens and 0 for the last 500B, so the routing stops moving while the
# learning rate anneals. `TrainConfig` holds both as a late value and the fraction of the run where
# it starts (`mtp_lambda_late`, `mtp_switch` = 10 / 14.8 = 0.68; `gamma_late`, `gamma_switch` =
# 14.3 / 14.8 = 0.966); `mtp_weight(cfg, step)` and `bias_speed(cfg, step)` are what the loop applies.
# A model this small learns little in the last 3.4% of 200 steps, so the run below uses the report's
# lambda schedule as it is and its gamma schedule in shape, with a gamma ten times larger (0.01):
# at 0.001 a bias moves at most 0.2 in 200 steps, too little to balance (section 4 measures it).

# %%
run = Path(tempfile.mkdtemp()) / "notebook"
cfg = TrainConfig(out_dir=str(run), steps=STEPS, batch_size=16, seq_len=128, eval_every=max(STEPS // 4, 1),
                  eval_batches=4, warmup=min(20, STEPS // 4 + 1), mtp_lambda=0.3, mtp_lambda_late=0.1,
                  gamma=0.01, gamma_late=0.0)
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.8))
tokens_t = torch.linspace(0, 14.8, 500)
a.plot(tokens_t, torch.where(tokens_t < 10, 0.3, 0.1), label="lambda (MTP weight)")
a.plot(tokens_t, torch.where(tokens_t < 14.3, 0.001, 0.0) * 100, label="gamma x 100 (bias speed)")
a.set(xlabel="training tokens (T)", ylabel="value", title="the report's schedules (14.8T tokens)")
steps_ = range(STEPS)
b.plot(steps_, [mtp_weight(cfg, s) for s in steps_], label="lambda")
b.plot(steps_, [bias_speed(cfg, s) * 10 for s in steps_], label="gamma x 10")
b.set(xlabel="step", ylabel="value", title=f"this run ({STEPS} steps)")
for ax in (a, b):
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
late = [s for s in steps_ if mtp_weight(cfg, s) == 0.1]
frozen = [s for s in steps_ if bias_speed(cfg, s) == 0.0]
print(f"lambda 0.1 from step {late[0] + 1}, gamma 0 from step {frozen[0] + 1} of {STEPS}")

# %% [markdown]
# ## 2. A minute of training
#
# `dsv3ref.train.train` is an ordinary loop: next-token loss plus the MTP loss (eqs. 24-25), AdamW
# with warmup and cosine decay, gradient clipping, and after every step the routers' bias update
# b_i += gamma * sign(mean load - load_i). Tokens are bytes: a 256-entry vocabulary keeps the embedding
# and head small (DeepSeek-V3's 129,280 tokens would be 30 times the rest of this model). The progress
# bar shows the steps, the loss and the bytes per second.

# %%
# NBVAL_IGNORE_OUTPUT
# (nbval: the progress bar's times differ from run to run)
with contextlib.redirect_stderr(sys.stdout):  # the bar on stdout: a notebook shows stderr as an alarm
    final = train(cfg, corpus=corpus)

# %%
# NBVAL_IGNORE_OUTPUT
# (nbval: these digits depend on the CPU's BLAS rounding, which training or FP8 rounding carries
# into the printed values; the checks at the end assert what the lesson claims)
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training (main)")
ax.plot([r["step"] for r in rows], [r["mtp_loss"] / mtp_weight(cfg, r["step"] - 1) for r in rows],
        label="training (MTP, depth 1)", alpha=0.7)
val = [r for r in rows if "val_loss" in r]
ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation (main)")
ax.axhline(math.log(256), ls="--", color="gray")
ax.text(1, 5.6, "uniform over 256 bytes", fontsize=8)
ax.set(xlabel="step", ylabel="nats per byte", title=f"{STEPS} steps")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"validation loss {final['val_loss']:.3f} nats/byte, MTP module {final['val_mtp_loss']:.3f}, "
      f"MaxVio {final['val_maxvio']:.2f}")

# %% [markdown]
# ## 3. What it learned
#
# Continuations of a line of Python, sampled at temperature 0.7 (seeded), from the trained model and
# from the same architecture untrained. After a minute the model writes Python's shape (`self.`,
# indentation, `None:`, comments) with invented words; greedy decoding of so small a model soon
# repeats one byte, which is why we sample. Then self-speculative decoding (lesson 05): the MTP module
# drafts the token after next, the main model verifies. The tokens must be exactly the greedy ones;
# what training changes is how often the draft is accepted.

# %%
# NBVAL_IGNORE_OUTPUT
# (nbval: these digits depend on the CPU's BLAS rounding, which training or FP8 rounding carries
# into the printed values; the checks at the end assert what the lesson claims)
model = DeepseekV3.from_pretrained(run / f"step_{STEPS:06d}")
untrained = DeepseekV3(model.config).eval()
prompt = encode("    def __init__(self, ")
for label, m in (("trained", model), ("untrained", untrained)):
    out = generate(m, [prompt], 64, eos_token_id=[], temperature=0.7, seed=0)
    print(f"{label:9}: {decode(prompt + out.tokens[0])!r}")

prompts = [corpus.validation[i * 997: i * 997 + 48].tolist() for i in range(4)]
accept = {}
for label, m in (("trained", model), ("untrained", untrained)):
    plain = generate(m, prompts, 32, eos_token_id=[])
    spec = generate(m, prompts, 32, eos_token_id=[], speculative=True)
    accept[label] = (spec.stats["acceptance_rate"], spec.stats["tokens_per_forward"], spec.tokens == plain.tokens)
    print(f"{label:9}: draft acceptance {accept[label][0]:.0%}, {accept[label][1]:.2f} tokens per main forward, "
          f"same tokens as greedy: {accept[label][2]}")

# %% [markdown]
# Read the acceptance with care: greedy decoding of a model this small soon repeats itself, and a
# repetition is easy to draft, which lifts the rate. Section 4 measures the same on held-out prompts
# after 300 steps; the report's 85-90% is for BPE tokens at 671B, a harder target.

# %% [markdown]
# ## 4. The report's claims at small scale, three seeds each
#
# `experiments/train_claims.py` trains the same model for 300 steps per setting, each with seeds 0, 1
# and 2 (the seed sets the initialization and every batch, so two settings of one seed differ only by
# the setting), and writes its numbers and figures to `experiments/results/`. A difference between
# two settings counts here only if it has the same sign in every seed and is larger than the spread
# of the seeds themselves; figures show the mean over seeds as a line and their range as a band.


# %%
results = Path(dsv3ref.__file__).resolve().parents[1] / "experiments" / "results"  # beside the package
balance = json.loads((results / "balance.json").read_text())
mtp = json.loads((results / "mtp.json").read_text())
fp8 = json.loads((results / "fp8.json").read_text())
seeds = balance["seeds_trained"]


def pm(stat, fmt=".3f"):
    """mean +- standard deviation over the seeds."""
    return f"{stat['mean']:{fmt}} +- {stat['std']:{fmt}}"


def holds(a, b):
    """Whether a < b in every seed (paired: the same seed's runs) by more than the seeds' own spread."""
    diffs = [y - x for x, y in zip(a["values"], b["values"], strict=True)]
    spread = max(a["std"], b["std"])
    return all(d > 0 for d in diffs) and sum(diffs) / len(diffs) > spread

# %% [markdown]
# **Load balance.** The auxiliary-loss-free bias update (at the report's gamma = 0.001, and ten times
# faster) against a classic auxiliary loss (alpha = 0.01) and against no balancing. MaxVio = max load /
# mean load - 1 on the validation batches (0: perfectly even). The report's claim (§2.1.2, and the
# loss-free balancing paper, arXiv 2408.15664): the bias balances as well as or better than an
# auxiliary loss, without the loss's gradient hurting the model.

# %%
runs = balance["runs"]
print(f"{'balancing':22} {'final validation loss':>24} {'final MaxVio':>16} {'mean MaxVio':>16}   ({len(seeds)} seeds)")
for name, r in runs.items():
    print(f"{name:22} {pm(r['final_val_loss']):>24} {pm(r['final_val_maxvio'], '.2f'):>16} "
          f"{pm(r['mean_val_maxvio'], '.2f'):>16}")
bias, fast, aux, none = (runs[k] for k in ("bias, gamma 0.001", "bias, gamma 0.01", "aux loss, alpha 0.01", "none"))
verdicts = {
    "the bias balances better than no balancing": holds(bias["final_val_maxvio"], none["final_val_maxvio"]),
    "at the report's gamma, the bias balances better than the aux loss": holds(bias["final_val_maxvio"],
                                                                                aux["final_val_maxvio"]),
    "at gamma 0.01, the bias balances better than the aux loss": holds(fast["final_val_maxvio"],
                                                                        aux["final_val_maxvio"]),
    "the aux loss ends with a worse validation loss than the bias": holds(fast["final_val_loss"],
                                                                           aux["final_val_loss"]),
}
for claim, ok in verdicts.items():
    print(f"{'reproduced' if ok else 'NOT reproduced':15} {claim}")
display(Image(filename=str(results / "balance.png")))

# %% [markdown]
# What this shows: the bias update balances (far below no balancing, in every seed, with no term in
# the loss). At the report's gamma it is *not* better balanced than the auxiliary loss after 300
# steps: a bias moves at most gamma per step, 0.3 in this whole run, and the report trains for
# hundreds of thousands of steps; its MaxVio is still falling when the run ends. Ten times faster, the
# bias update reaches the auxiliary loss's balance, and whether it beats it is within the seeds'
# spread here. The auxiliary loss does not measurably hurt this model's validation loss (the
# differences are within the seeds' spread), unlike the larger models of the loss-free balancing
# paper: at 0.9M parameters and 0.6M bytes the report's quality claim cannot be resolved.

# %% [markdown]
# **MTP.** The main model trained with and without the MTP objective (lambda 0.3 and 0) for the same
# steps, and the MTP draft's acceptance on held-out text (the report: 85-90% for the second token, at
# 671B, §5.4.3). The report's claim (§2.2, ablations in §4.5.1): the MTP objective improves the main
# model.

# %%
print(f"validation loss with MTP {pm(mtp['with_mtp_final_val_loss'])}, without {pm(mtp['without_mtp_final_val_loss'])}; "
      f"gain per seed {[f'{g:.1%}' for g in mtp['relative_gain']['values']]}")
mtp_holds = holds(mtp["with_mtp_final_val_loss"], mtp["without_mtp_final_val_loss"])
print(f"{'reproduced' if mtp_holds else 'NOT reproduced':15} the MTP objective improves the main model at equal steps")
print(f"{'reproduced' if min(mtp['acceptance_rate']['values']) > 0.5 else 'NOT reproduced':15} the trained MTP "
      "module's drafts are mostly accepted")
print(f"draft acceptance (greedy, held-out prompts): trained {pm(mtp['acceptance_rate'], '.1%')}, untrained "
      f"{pm(mtp['untrained_acceptance_rate'], '.1%')}; speculative tokens equal greedy in every seed: "
      f"{mtp['same_tokens_as_greedy']}")
display(Image(filename=str(results / "mtp.png")))

# %% [markdown]
# What this shows: one seed (seed 0) gains clearly from the MTP objective, 7% of its validation loss;
# the other two gain under 1% and nothing. The gain is not of one sign beyond the seeds' spread, so
# the claim is *not* reproduced at this scale: at 0.9M parameters and 300 steps the MTP objective's
# effect on the main model cannot be told from the variation between seeds. A single run, seed 0's,
# would have reported 7% (this course's first pass did): which is why a claim that rests on a
# difference is measured over several seeds. What is reproduced is the draft's usefulness: the trained
# module's drafts are accepted about 89% of the time in every seed, against none for an untrained
# one, and the tokens are exactly greedy's; the rate lies in the report's 85-90%, but for bytes and
# greedy repetitions, which are easy to draft, so the match is not like for like.

# %% [markdown]
# **FP8.** The same run with every FP8 layer's three GEMMs in FP8 (1x128 activation tiles, 128x128
# weight blocks, 128x1 tiles for the weight gradient; `dsv3ref.train.fp8`), against float32. The
# report's claim (§3.3, appendix B.1): FP8 training's loss stays within 0.25% of BF16's.

# %%
print(f"training loss, mean of the last 30 steps: float32 {pm(fp8['final_train_loss_f32'], '.4f')}, FP8 "
      f"{pm(fp8['final_train_loss_fp8'], '.4f')}")
print(f"FP8 against float32, same seed: {pm(fp8['relative_difference'], '.2%')} (per seed "
      f"{[f'{d:+.2%}' for d in fp8['relative_difference']['values']]}); float32 against float32 of another seed: "
      f"{[f'{d:+.2%}' for d in fp8['float32_seed_to_seed']['values']]}")
within = max(abs(d) for d in fp8["relative_difference"]["values"])
noise = max(abs(d) for d in fp8["float32_seed_to_seed"]["values"])
print(f"{'reproduced' if within < 0.0025 else 'NOT resolved':15} FP8 within 0.25% of the high-precision loss "
      f"(largest difference here {within:.2%}; float32's own seed-to-seed differences reach {noise:.2%})")
display(Image(filename=str(results / "fp8.png")))

# %% [markdown]
# What this shows: FP8 training follows float32 closely, and its difference from float32 is of the
# size of float32's own differences between seeds, so at 300 steps this experiment cannot tell FP8's
# effect from training noise. It cannot confirm the report's 0.25%, which averages over runs of 1T
# tokens where a 300-step run's noise has long averaged out; `docs/training.md` also measures where
# the difference comes from (each layer's E4M3 rounding of both operands).

# %% [markdown]
# ## Checks

# %%
assert final["val_loss"] < 0.6 * math.log(256) or STEPS < 60         # it learned (uniform bytes: 5.55 nats)
assert late[0] == math.ceil(0.68 * STEPS) and frozen[0] == math.ceil(0.966 * STEPS)  # the schedules' switches
assert accept["trained"][2] and accept["untrained"][2]              # speculative == greedy, always
assert accept["trained"][0] > accept["untrained"][0] + 0.2           # and trained drafts are accepted far more
assert len(seeds) >= 3 and verdicts["the bias balances better than no balancing"]
assert not verdicts["at the report's gamma, the bias balances better than the aux loss"]  # said above, plainly
assert not mtp_holds and mtp["same_tokens_as_greedy"]                # said above, plainly
assert min(mtp["acceptance_rate"]["values"]) > max(mtp["untrained_acceptance_rate"]["values"]) + 0.5
print("all checks passed")

# %% [markdown]
# **Next:** [10_kernels.ipynb](10_kernels.ipynb), the kernels behind the model: the paged latent cache,
# grouped GEMM layouts, dispatch and combine, and a model run through a planted-bug kernel. The course's
# map is in [README.md](README.md); the training results, in `docs/training.md`.
