"""A corpus on every machine, with no download: the Python standard library's own source.

Every Python installation ships its standard library as `.py` files: code, docstrings and
comments in English, about 30 MB of text. We read them in a fixed order (sorted relative paths),
put each file in the training or the validation split by a hash of its path (one in 20 files,
about 5%, is validation), and cut them into bytes.

The tokenizer is byte-level: token = byte value (0-255), plus nothing else. A model that trains in
minutes on two cores has a width of 64-128; DeepSeek-V3's 129,280-token vocabulary would make its
embedding and output layer over 90% of the parameters and most of the compute (129,280 x 128 x 2
= 33M parameters against a body of about 1M), while bytes need 256 x 128 x 2 = 65K. The price is
longer sequences (about 4 bytes per BPE token), which a model this size can afford.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256
VALIDATION_EVERY = 20


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's .py files (site-packages and test suites left out), sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def is_validation(relative: str) -> bool:
    """Whether a file (by its path relative to the library root) belongs to the validation split."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % VALIDATION_EVERY == 0


@dataclass
class Corpus:
    """The two splits as byte tensors (uint8), each file followed by a newline."""

    train: torch.Tensor
    validation: torch.Tensor
    files: tuple[int, int]
    """(training files, validation files)."""

    @classmethod
    def stdlib(cls, max_bytes: int | None = None, root: str | Path | None = None) -> Corpus:
        """Read the standard library; max_bytes caps each split (the first files in sorted order)."""
        root = Path(root or sysconfig.get_paths()["stdlib"])
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        sizes = {False: 0, True: 0}
        for path in stdlib_files(root):
            val = is_validation(path.relative_to(root).as_posix())
            if max_bytes is not None and sizes[val] >= max_bytes * (1 if not val else 0.1):
                continue
            data = path.read_bytes() + b"\n"
            parts[val].append(data)
            sizes[val] += len(data)
        if not parts[False] or not parts[True]:
            raise FileNotFoundError(f"{root}: found no standard library source files (*.py) to train on")

        def tensor(chunks: list[bytes]) -> torch.Tensor:
            return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).clone()
        return cls(train=tensor(parts[False]), validation=tensor(parts[True]),
                   files=(len(parts[False]), len(parts[True])))


def batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> torch.Tensor:
    """Step `step`'s batch: batch_size random windows of seq_len bytes, as int64 token ids.

    The windows depend on (seed, step) only, so a run resumed at step s reads exactly the batches an
    uninterrupted run reads from step s on.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
    return torch.stack([data[s:s + seq_len] for s in starts.tolist()]).long()


def encode(text: str) -> list[int]:
    """Text -> byte tokens (UTF-8)."""
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    """Byte tokens -> text (invalid UTF-8 shown as U+FFFD)."""
    return bytes(tokens).decode("utf-8", errors="replace")
