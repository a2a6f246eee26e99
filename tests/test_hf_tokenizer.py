"""load_tokenizer against transformers' PreTrainedTokenizerFast on the same folder."""

import json
import subprocess
import sys

import numpy as np
import pytest

import nnjax as nj
from nnjax.models import hf

tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Large language models read tokens, not characters.",
    "nnjax loads Hugging Face folders one tensor at a time.",
    "Byte-level BPE merges frequent pairs of bytes into tokens.",
] * 4
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does the fox do?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (no download), saved as a model folder has it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_same_ids_text_and_special_tokens_as_transformers(folder, reference):
    tok = hf.load_tokenizer(folder)
    texts = ["The lazy fox reads tokens.", "Hugging Face folders, one tensor at a time!", ""]
    for text in texts:
        assert tok.encode(text) == reference.encode(text)
        assert tok.encode(text, add_special_tokens=False) == reference.encode(
            text, add_special_tokens=False
        )
    ids = tok.encode_batch(texts)
    assert ids == reference(texts)["input_ids"]
    assert ids[0][0] == 1  # the post-processor's <s>
    assert tok.decode_batch(ids) == reference.batch_decode(ids, skip_special_tokens=True)
    assert tok.decode(ids[1]) == reference.decode(ids[1], skip_special_tokens=True)
    assert tok.decode(ids[1], skip_special_tokens=False) == reference.decode(ids[1])
    assert (
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        == (
            reference.bos_token_id,
            reference.eos_token_id,
            reference.pad_token_id,
        )
        == (1, 2, 3)
    )
    assert tok.vocab_size == len(reference)


def test_chat_template_as_transformers_renders_it(folder, reference):
    pytest.importorskip("jinja2")
    tok = hf.load_tokenizer(folder)
    for gen in (False, True):
        text = tok.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=False)
        assert text == reference.apply_chat_template(
            CHAT, add_generation_prompt=gen, tokenize=False
        )
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=gen)
        want = reference.apply_chat_template(CHAT, add_generation_prompt=gen, tokenize=True)
        assert ids == list(getattr(want, "input_ids", want))
    assert text.endswith("<|assistant|>\n") and text.startswith("<s><|system|>\nBe brief.</s>\n")


def test_chat_template_renders_in_a_fresh_process(folder, reference):
    # jinja2.ext must be imported by nnjax itself, not left to transformers' imports.
    pytest.importorskip("jinja2")
    code = (
        "import json, sys; from nnjax.models import hf; "
        f"print(json.dumps(hf.load_tokenizer({str(folder)!r}).apply_chat_template("
        f"{CHAT!r}, tokenize=False)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    want = reference.apply_chat_template(CHAT, tokenize=False)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want


def test_generation_config_ids_win_and_simple_template(folder, tmp_path):
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = hf.load_tokenizer(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, (2, 3), None)
    assert tok.chat_template is None
    text = tok.apply_chat_template(CHAT[1:], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>\nWhat does the fox do?\n<|assistant|>\n"


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(nj.CheckpointError, match=r"tokenizer\.json does not exist"):
        hf.load_tokenizer(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"pip install nnjax\[llm\]"):
        hf.load_tokenizer(tmp_path)


def test_pad_gives_ids_mask_and_lengths_as_transformers_pads(folder, reference):
    tok = hf.load_tokenizer(folder)
    texts = SENTENCES[:3]
    for side in ("left", "right"):
        ours = tok.encode_padded(texts, side=side)
        reference.padding_side = side
        want = reference(texts, padding=True, return_tensors="np")
        np.testing.assert_array_equal(ours["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], want["attention_mask"])
        np.testing.assert_array_equal(ours["lengths"], want["attention_mask"].sum(-1))
    assert tok.pad([[5], [6, 7]], max_length=3)["input_ids"].tolist() == [[5, 3, 3], [6, 7, 3]]
    with pytest.raises(nj.ArgumentError, match=r"max_length: row 1 has 2 ids, more than"):
        tok.pad([[5], [6, 7]], max_length=1)
    with pytest.raises(nj.ArgumentError, match=r"side: expected 'left' or 'right'"):
        tok.pad([[5]], side="center")


def test_save_pretrained_with_a_tokenizer_makes_a_complete_folder(folder, reference, tmp_path):
    import jax
    import jax.numpy as jnp

    transformers = pytest.importorskip("transformers")
    tok = hf.load_tokenizer(folder)
    config = hf.config_from_hf({"model_type": "llama", "vocab_size": tok.vocab_size,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1})  # fmt: skip
    params, _ = nj.models.CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    out = tmp_path / "export"
    hf.save_pretrained(out, config, params, tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()
    }
    again = transformers.AutoTokenizer.from_pretrained(out)
    for text in SENTENCES[:4]:
        assert again(text)["input_ids"] == reference(text)["input_ids"]
    assert again.apply_chat_template(CHAT, tokenize=False) == reference.apply_chat_template(
        CHAT, tokenize=False
    )
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")
    mine = hf.load_tokenizer(out)
    assert mine.encode(SENTENCES[0]) == tok.encode(SENTENCES[0])
    assert mine.chat_template == tok.chat_template
