"""nnjax models in lm-evaluation-harness (``pip install nnjax[eval]``).

:class:`NNJaxLM` is an ``lm_eval`` model (registered as ``"nnjax"``) for a
:func:`~nnjax.models.CausalLM`: ``loglikelihood`` (multiple choice),
``loglikelihood_rolling`` (perplexity) and ``generate_until`` (KV-cached greedy or
sampled generation with stop sequences). It follows the harness's own Hugging Face
backend step for step (the same context/continuation split, rolling windows, prefix
token and stop handling), so the two give the same numbers on the same weights::

    import lm_eval
    from nnjax.eval import NNJaxLM

    lm = NNJaxLM("runs/pretrain/hf", batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or ``python -m nnjax.eval --model-dir runs/pretrain/hf --tasks hellaswag``, or
``lm_eval --model nnjax --model_args model_dir=runs/pretrain/hf``.

Batches are padded to ``batch_size`` rows and their lengths rounded up to a multiple
of ``length_bucket`` tokens, so a whole evaluation compiles a handful of shapes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from nnjax.core.errors import ArgumentError
from nnjax.eval.perplexity import token_scorer
from nnjax.models.generate import generate
from nnjax.models.hf.pretrained import from_pretrained
from nnjax.models.hf.tokenizer import load_tokenizer

__all__ = ["NNJaxLM"]

Pair = tuple[Any, list[int], list[int]]  # (request strings, context ids, continuation ids)


def _bucket(n: int, step: int, cap: int) -> int:
    return min(-(-n // step) * step, cap)


@register_model("nnjax")
class NNJaxLM(TemplateLM):
    """An lm-evaluation-harness model over an nnjax ``CausalLM``.

    Args:
        model_dir: a Hugging Face model folder (``config.json``, safetensors,
            ``tokenizer.json``), as ``examples/pretrain_llm.py`` exports; or give
            ``config``, ``params`` and ``tokenizer`` instead.
        config, params: a :class:`~nnjax.models.CausalLMConfig` and its params.
        tokenizer: an :func:`nnjax.models.hf.load_tokenizer` tokenizer (or the folder
            to load one from).
        batch_size: rows per model call (also for generation).
        max_length: the longest context; default the model's ``max_position``.
        max_gen_toks: the default number of tokens ``generate_until`` writes.
        length_bucket: sequence lengths are rounded up to a multiple of this.
        dtype: the params' dtype when loading ``model_dir`` (``jnp.bfloat16``).
        seed: the generation rng's seed, where a task samples.
        **kwargs: what the harness's command line passes (``device``,
            ``max_batch_size``): ignored.

    Raises:
        ArgumentError: neither ``model_dir`` nor ``config``/``params``/``tokenizer``, or a
            tokenizer without an end-of-sequence id.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        config: Any = None,
        params: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        length_bucket: int = 64,
        dtype: Any = None,
        seed: int = 0,
        **kwargs: Any,
    ):
        super().__init__()
        if model_dir is not None:
            config, params = from_pretrained(model_dir, dtype=dtype)
            tokenizer = tokenizer or os.fspath(model_dir)
        if config is None or params is None or tokenizer is None:
            raise ArgumentError(
                "NNJaxLM: expected model_dir=, or config=, params= and tokenizer= together"
            )
        self.tok = (
            load_tokenizer(tokenizer) if isinstance(tokenizer, str | os.PathLike) else tokenizer
        )
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else config.eos_token_id
        eos = eos[0] if isinstance(eos, tuple | list) else eos
        if eos is None:
            raise ArgumentError("NNJaxLM: the tokenizer and config name no end-of-sequence id")
        self.config, self.params, self._eot = config, params, int(eos)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length or config.max_position)
        self.max_gen_toks = int(max_gen_toks)
        self.length_bucket = int(length_bucket)
        self.rng = jax.random.key(seed)
        self._score = token_scorer(config)

    # --- tokens --------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        bos = self.tok.bos_token_id
        return self._eot if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """As the harness's HF backend: the tokenizer's default special tokens, unless the
        text already starts with the prefix token's text."""
        if add_special_tokens is None:
            prefix = self.tok.decode([self.prefix_token_id], skip_special_tokens=False)
            add_special_tokens = not has_bos_prefix(string, prefix)
        ids = list(self.tok.encode(string, add_special_tokens=add_special_tokens))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Any, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int | np.integer) else list(tokens)
        return self.tok.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ---------------------------------------------------------------------

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Each ``(ids, n)``: the log-prob of the last ``n`` ids after the ones before."""
        width = _bucket(max(len(ids) - 1 for ids, _ in rows), self.length_bucket, self.max_length)
        b = self.batch_size
        ids = np.zeros((b, width), np.int32)
        targets = np.zeros((b, width), np.int32)
        mask = np.zeros((b, width), bool)
        for r, (row, n) in enumerate(rows):
            inp = row[-(self.max_length + 1) :][:-1]
            ids[r, : len(inp)] = inp
            targets[r, len(inp) - n : len(inp)] = row[-n:]
            mask[r, len(inp) - n : len(inp)] = True
        sums, greedy = jax.device_get(self._score(self.params, ids, targets, mask))
        return [(float(sums[r]), bool(greedy[r])) for r in range(len(rows))]

    def _loglikelihood_tokens(
        self, requests: list[Pair], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        out: list[Any] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="nnjax loglikelihood")
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            rows = [(requests[i][1] + requests[i][2], len(requests[i][2])) for i in chunk]
            for i, result in zip(chunk, self._score_rows(rows), strict=True):
                out[i] = result
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood in windows of ``max_length``, as the HF backend."""
        windows: list[tuple[int, Pair]] = []
        for index, (string,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, rolling):
                windows.append((index, (None, context, continuation)))
        scores = self._loglikelihood_tokens([w for _, w in windows], disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for (index, _), (logprob, _) in zip(windows, scores, strict=True):
            totals[index] += logprob
        return totals

    # --- generation ------------------------------------------------------------------

    def _generate_batch(self, contexts: list[str], kwargs: dict[str, Any]) -> list[str]:
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        kwargs = dict(normalize_gen_kwargs(kwargs, self.max_gen_toks))
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        n = int(kwargs.pop("max_gen_toks"))
        if n >= self.max_length:
            raise ArgumentError(
                f"max_gen_toks: expected fewer than max_length == {self.max_length}, got {n}"
            )
        encoded = [self.tok_encode(c, left_truncate_len=self.max_length - n) for c in contexts]
        t0 = _bucket(max(len(e) for e in encoded), self.length_bucket, self.max_length - n)
        b = self.batch_size
        prompts = np.full((b, t0), self.prefix_token_id, np.int32)
        lengths = np.ones((b,), np.int32)
        for r, e in enumerate(encoded):
            prompts[r, t0 - len(e) :] = e
            lengths[r] = len(e)
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        sample = bool(kwargs.get("do_sample")) and temperature > 0
        self.rng, key = jax.random.split(self.rng)
        out = generate(
            self.config,
            self.params,
            prompts,
            n,
            temperature=temperature if sample else 0.0,
            top_p=kwargs.get("top_p") if sample else None,
            top_k=kwargs.get("top_k") if sample else None,
            eos_token_id=self.eot_token_id,
            prompt_lengths=lengths,
            rng=key if sample else None,
        )
        texts = []
        for row in np.asarray(out)[: len(contexts), t0:].tolist():
            if self.eot_token_id in row:  # the rest is padding
                row = row[: row.index(self.eot_token_id) + 1]
            texts.append(postprocess_generated_text(self.tok_decode(row), until, None))
        return texts

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task's ``generation_kwargs`` ask) continuations, cut at
        the first stop sequence; batched by identical settings, longest contexts first."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
        out: list[Any] = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="nnjax generate_until")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(self.tok_encode(args[i][0])))
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo : lo + self.batch_size]
                texts = self._generate_batch([args[i][0] for i in chunk], dict(args[chunk[0]][1]))
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out
