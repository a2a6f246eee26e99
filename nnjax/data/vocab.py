"""Tokenizer folders made here, without a download: UTF-8 bytes, or a text's characters.

Each writes ``tokenizer.json`` (and ``tokenizer_config.json``) into a folder, so the
tokenizer travels like any model's: :func:`nnjax.models.hf.load_tokenizer`, ``nnjax
tokenize --tokenizer DIR``, an exported model folder, ``transformers.AutoTokenizer``
and lm-evaluation-harness all read it. Needs ``tokenizers`` (``pip install nnjax[llm]``).
"""

from __future__ import annotations

import json
import os

from nnjax.core.errors import DataError

__all__ = ["byte_tokenizer", "char_tokenizer"]


def _write(folder: str | os.PathLike, tokenizer: object, special: dict) -> str:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))  # type: ignore[attr-defined]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**config, **special}, f, indent=2)
    return folder


def byte_tokenizer(folder: str | os.PathLike) -> str:
    """A tokenizer whose ids are the UTF-8 bytes (as :class:`nnjax.data.ByteTokenizer`).

    Byte-level (GPT-2's byte-to-character map) with no merges: 256 ids, id ``b`` for
    byte ``b``; NUL (id 0) is the end-of-sequence token.

    Returns:
        ``folder``.

    Example:
        >>> folder = nj.data.byte_tokenizer("bytes-tok")
        >>> tok = nj.models.hf.load_tokenizer(folder)
        >>> tok.encode("hé"), tok.vocab_size, tok.eos_token_id
        ([104, 195, 169], 256, 0)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2's map: the printable bytes stand for themselves, the others follow from U+0100
    chars = {b: chr(b) for b in range(256) if chr(b) in alphabet}
    extra = iter(range(256, 512))
    for b in range(256):
        if b not in chars:
            chars[b] = chr(next(extra))
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(chars[0], special=True)])
    return _write(folder, tok, {"eos_token": chars[0], "pad_token": chars[0]})


def char_tokenizer(text: str, folder: str | os.PathLike) -> str:
    """A character-level tokenizer over the characters of ``text``, as nanoGPT's shakespeare_char.

    Id ``i`` is the ``i``-th character of ``sorted(set(text))`` (nanoGPT's ``stoi``);
    characters not in ``text`` are dropped when encoding. No end-of-sequence token.

    Returns:
        ``folder``.

    Raises:
        DataError: an empty ``text``.

    Example:
        >>> tok = nj.models.hf.load_tokenizer(nj.data.char_tokenizer("hello", "chars"))
        >>> tok.encode("hole"), tok.decode([3, 1, 2, 2, 3]), tok.vocab_size
        ([1, 3, 2, 0], 'ohllo', 4)
    """
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set(text))
    if not chars:
        raise DataError("char_tokenizer: expected a non-empty text")
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, []))
    tok.decoder = decoders.Fuse()
    return _write(folder, tok, {})
