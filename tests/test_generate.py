"""generate and the sampling filters: against transformers' greedy generate and a NumPy reference."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnjax as nj
from nnjax.models import CausalLMConfig, filter_logits, generate, make_generate
from tests.hf_reference import hf_model, nnjax_config, nnjax_params

generate_lib = sys.modules["nnjax.models.generate"]  # nj.models.generate is the function


@functools.cache
def _llama():
    # initializer_range 0.2: peaked logits, so argmax ties between the two sides cannot happen
    model = hf_model("llama", initializer_range=0.2)
    return model, nnjax_config(model), nnjax_params(model)


@functools.cache
def _gpt2():
    import torch
    import transformers as tr

    torch.manual_seed(0)
    hf = tr.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2
    )
    model = tr.GPT2LMHeadModel(hf).eval()
    cfg = nj.models.hf.gpt2_config(hf)
    params = nj.models.hf.gpt2_to_params(model.state_dict(), cfg)
    return model, cfg, params


def _hf_greedy(torch, model, prompt, n):
    ids = torch.from_numpy(np.asarray(prompt)).long()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out.numpy()


def _prompts(seed, lengths, vocab=64):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=(1, n)).astype(np.int32) for n in lengths]


def _left_pad(rows):
    t0 = max(r.shape[1] for r in rows)
    out = np.zeros((len(rows), t0), np.int32)
    for b, r in enumerate(rows):
        out[b, t0 - r.shape[1] :] = r[0]
    return out, np.array([r.shape[1] for r in rows], np.int32)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_equals_transformers_including_a_left_padded_batch(torch, family):
    model, cfg, params = _llama() if family == "llama" else _gpt2()
    rows = _prompts(1, [6, 3, 5])
    n = 10
    prompt, lengths = _left_pad(rows)
    eos = model.config.eos_token_id if family == "llama" else None  # GPT-2's is past vocab 64
    pad = 0 if eos is None else eos  # ours: the eos id when no pad id is given
    out = generate(cfg, params, prompt, n, temperature=0, prompt_lengths=lengths, eos_token_id=eos)
    out = np.asarray(out)
    assert out.shape == (3, 6 + n)
    np.testing.assert_array_equal(out[:, :6], prompt)
    stopped = 0
    for b, r in enumerate(rows):
        expected = _hf_greedy(torch, model, r, n)[0, r.shape[1] :]  # shorter when eos came
        np.testing.assert_array_equal(out[b, 6 : 6 + expected.size], expected, err_msg=f"row {b}")
        np.testing.assert_array_equal(out[b, 6 + expected.size :], pad)
        stopped += expected.size < n
    assert family == "gpt2" or stopped  # the eos path is exercised against transformers


def test_sliding_window_model_generates_past_max_position_like_transformers(torch):
    model = hf_model("mistral", max_position_embeddings=8, initializer_range=0.2)
    cfg, params = nnjax_config(model), nnjax_params(model)
    assert cfg.sliding_window == 4 and cfg.max_position == 8
    prompt = _prompts(7, [6])[0]
    eos = model.config.eos_token_id
    out = np.asarray(generate(cfg, params, prompt, 10, temperature=0, eos_token_id=eos))
    expected = _hf_greedy(torch, model, prompt, 10)[0]  # shorter if eos came
    assert expected.size > 9  # past max_position == 8
    np.testing.assert_array_equal(out[0, : expected.size], expected)
    np.testing.assert_array_equal(out[0, expected.size :], eos)


def test_eos_ends_a_row_and_finished_rows_emit_padding():
    _, cfg, params = _llama()
    prompt, lengths = _left_pad(_prompts(2, [4, 4]))
    free = np.asarray(generate(cfg, params, prompt, 8, temperature=0, prompt_lengths=lengths))
    eos = int(free[0, 4 + 2])  # row 0's third new token
    out = np.asarray(
        generate(cfg, params, prompt, 8, temperature=0, eos_token_id=[63, eos], pad_token_id=7)
    )
    for b in range(2):
        new = free[b, 4:]
        hits = np.flatnonzero(np.isin(new, [63, eos]))
        stop = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(out[b, 4 : 4 + stop], new[:stop])
        np.testing.assert_array_equal(out[b, 4 + stop :], 7)
    assert (out[0, 7:] == 7).all()


def test_compiled_once_per_shape():
    _, cfg, params = _llama()
    before = generate_lib._generate_jit._cache_size()
    for seed in range(2):
        prompt, lengths = _left_pad(_prompts(seed, [3, 5]))
        generate(
            cfg,
            params,
            prompt,
            4,
            top_k=5,
            top_p=0.5 + 0.1 * seed,
            min_p=0.01 * seed,
            temperature=0.7 + seed,
            prompt_lengths=lengths,
            rng=jax.random.key(seed),
        )
    assert generate_lib._generate_jit._cache_size() == before + 1
    gen = make_generate(cfg, 3, temperature=0)
    gen(params, _left_pad(_prompts(5, [4]))[0])
    gen(params, _left_pad(_prompts(6, [4]))[0])
    assert gen._cache_size() == 1


# --- the filters against NumPy ----------------------------------------------------------


def _np_filter(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """transformers' warpers, written out in NumPy on one row: the kept ids and probabilities."""
    x = logits.astype(np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k is not None:
        keep &= x >= np.sort(x)[-top_k]
    if top_p is not None:
        p = np.where(keep, np.exp(x - x[keep].max()), 0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]
        keep_sorted = before < top_p
        keep &= np.isin(np.arange(x.size), order[keep_sorted])
    if min_p is not None:
        p = np.where(keep, np.exp(x - x[keep].max()), 0)
        p /= p.sum()
        keep &= p >= min_p * p.max()
    p = np.where(keep, np.exp(x - x[keep].max()), 0)
    return keep, p / p.sum()


LOGITS = np.log(np.array([0.3, 0.05, 0.2, 0.01, 0.15, 0.12, 0.1, 0.07], np.float32))


@pytest.mark.parametrize(
    "options",
    [
        dict(top_p=0.6),
        dict(top_p=0.65, temperature=0.5),
        dict(top_p=1.0),
        dict(min_p=0.4),
        dict(min_p=0.3, temperature=2.0),
        dict(top_k=5, top_p=0.7),
        dict(top_k=3, min_p=0.7),
        dict(top_k=6, top_p=0.9, min_p=0.3, temperature=0.8),
    ],
)
def test_filters_keep_the_numpy_set_with_renormalised_probabilities(options):
    keep, probs = _np_filter(LOGITS, **options)
    x = filter_logits(jnp.asarray(LOGITS)[None], **options)[0]
    np.testing.assert_array_equal(np.isfinite(x), keep)
    np.testing.assert_allclose(jax.nn.softmax(x), probs, rtol=1e-5, atol=1e-7)
    assert 0 < keep.sum() < LOGITS.size or options == dict(top_p=1.0)


def test_sampling_without_a_key_is_refused_and_greedy_needs_none():
    logits = jnp.asarray(LOGITS)[None]
    with pytest.raises(nj.ArgumentError, match=r"rng: sampling \(greedy=False\) needs a PRNG key"):
        nj.models.sample(logits, None, greedy=False)
    assert int(nj.models.sample(logits, None, greedy=True)[0]) == int(np.argmax(LOGITS))


def test_sampling_a_single_new_token_draws_from_the_last_logits():
    """One sampled token (no token loop): with top_k=1 the draw is the argmax of the
    model's own last-position logits, whatever the key."""
    cfg = CausalLMConfig(vocab_size=32, hidden_size=16, num_heads=2, mlp_hidden=32, num_layers=1)
    model = nj.models.CausalLM(cfg)
    prompt = jnp.asarray(_prompts(0, [5], vocab=32)[0])
    params, _ = model.init(jax.random.key(0), prompt)
    logits, _ = model.apply(params, {}, prompt)
    for seed in range(3):
        out = generate(cfg, params, prompt, 1, temperature=1.0, top_k=1, rng=jax.random.key(seed))
        assert out.shape == (1, 6)
        assert int(out[0, -1]) == int(jnp.argmax(logits[0, -1]))


def test_sample_counts_follow_the_filtered_distribution():
    options = dict(top_k=6, top_p=0.8, temperature=0.9)
    _, probs = _np_filter(LOGITS, **options)
    n = 20000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    draws = nj.models.sample(logits, jax.random.key(0), greedy=False, **options)
    counts = np.bincount(np.asarray(draws), minlength=LOGITS.size)
    assert (counts[probs == 0] == 0).all()
    kept = probs > 0
    expected = n * probs[kept]
    chi2 = float(np.sum((counts[kept] - expected) ** 2 / expected))
    assert chi2 < 20.5  # chi-square, kept - 1 <= 4 degrees of freedom: p ~ 0.0004


# --- bad arguments, refused before any work ------------------------------------------------


def test_bad_arguments_are_refused_before_tracing(monkeypatch):
    cfg = CausalLMConfig(vocab_size=16, hidden_size=16, num_heads=2, mlp_hidden=8, max_position=12)
    params, _ = nj.models.CausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    monkeypatch.setattr(generate_lib, "_generate_jit", None)  # any call past the checks fails
    ok = np.ones((2, 3), np.int32)
    key = jax.random.key(0)
    cases = [
        (dict(prompt_ids=np.array([[1, 16]])), r"prompt_ids: expected ids in \[0, 16\).*max 16"),
        (dict(prompt_ids=np.array([[-1, 2]])), r"prompt_ids: expected ids in \[0, 16\).*min -1"),
        (dict(temperature=float("nan")), r"temperature: expected a finite number >= 0, got nan"),
        (dict(temperature=float("inf")), r"temperature: expected a finite number >= 0, got inf"),
        (dict(temperature=-1.0), r"temperature: expected a finite number >= 0"),
        (dict(top_p=0.0), r"top_p: expected a finite number in \(0, 1\], got 0.0"),
        (dict(top_p=1.5), r"top_p: expected a finite number in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p: expected a finite number in \[0, 1\], got -0.1"),
        (dict(top_k=0), r"top_k: expected an int >= 1, got 0"),
        (dict(max_new_tokens=2.0), r"max_new_tokens: expected an int >= 1, got 2.0"),
        (dict(prompt_lengths=np.array([3, 0])), r"prompt_lengths: expected ints in \[1, 3\]"),
        (dict(prompt_lengths=np.array([3])), r"prompt_lengths: expected shape \(2,\)"),
        (dict(eos_token_id=16), r"eos_token_id: expected token ids in \[0, 16\), got 16"),
        (dict(rng=None), r"rng: generate samples when temperature > 0"),
        (dict(max_new_tokens=11), r"got 3 \+ 11 - 1 == 13; keep only the last 2 prompt tokens"),
    ]
    for bad, pattern in cases:
        kwargs = {"prompt_ids": ok, "max_new_tokens": 2, "rng": key, **bad}
        with pytest.raises(nj.ArgumentError, match=pattern):
            generate(cfg, params, **kwargs)
    with pytest.raises(nj.ArgumentError, match=r"config: expected a CausalLMConfig or GPTConfig"):
        generate({"vocab_size": 16}, params, ok, 2, temperature=0)


def test_left_padded_batch_with_attention_mask_equals_transformers_batch(torch):
    model, cfg, params = _llama()
    rows = _prompts(3, [6, 2, 4, 5])
    prompt, lengths = _left_pad(rows)
    mask = (np.arange(prompt.shape[1])[None] >= (prompt.shape[1] - lengths)[:, None]).astype(int)
    n, eos = 8, model.config.eos_token_id
    with torch.no_grad():  # transformers' own batched generate on the same left-padded batch
        want = model.generate(
            torch.from_numpy(prompt).long(),
            attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
        ).numpy()
    out = np.asarray(
        generate(cfg, params, prompt, n, temperature=0, attention_mask=mask, eos_token_id=eos,
                 pad_token_id=0)
    )  # fmt: skip
    np.testing.assert_array_equal(out[:, : want.shape[1]], want)
    np.testing.assert_array_equal(out[:, want.shape[1] :], 0)  # all rows ended: padding
    again = np.asarray(
        generate(cfg, params, prompt, n, temperature=0, prompt_lengths=lengths, eos_token_id=eos,
                 pad_token_id=0)
    )  # fmt: skip
    np.testing.assert_array_equal(again, out)
    fn = make_generate(cfg, n, temperature=0, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(np.asarray(fn(params, prompt, attention_mask=mask)), out)


def test_unmarked_or_right_padding_is_refused_not_guessed():
    _, cfg, params = _llama()
    prompt, lengths = _left_pad(_prompts(3, [6, 2]))  # row 1 starts with pad id 0
    with pytest.raises(nj.ArgumentError, match=r"prompt_ids: rows \[1\] start with pad_token_id 0"):
        generate(cfg, params, prompt, 4, temperature=0, pad_token_id=0)
    right = np.stack([prompt[0], np.roll(prompt[1], 2)])  # tokens first, padding after
    mask = (right != 0).astype(np.int32)
    with pytest.raises(nj.ArgumentError, match=r"attention_mask: rows \[1\] are not left-padded"):
        generate(cfg, params, right, 4, temperature=0, attention_mask=mask)
    with pytest.raises(nj.ArgumentError, match="pass one of them"):
        generate(cfg, params, prompt, 4, temperature=0, attention_mask=mask, prompt_lengths=lengths)
    with pytest.raises(nj.ArgumentError, match=r"attention_mask: expected the shape of prompt_ids"):
        generate(cfg, params, prompt, 4, temperature=0, attention_mask=mask[:, 1:])
    # GPT-2's pad id is its eos id, which may open a prompt: no refusal there
    _, gcfg, gparams = _gpt2()
    generate(gcfg, gparams, prompt, 2, temperature=0, pad_token_id=0, eos_token_id=0)


def _weights_copy(model, change, only=lambda name: True):
    """A copy of the transformers ``model`` with ``change`` applied to the weights named ``only``."""
    import copy

    import torch

    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if only(name):
                p.copy_(change(p))
    return out


def _greedy_pair(torch, model, cfg, params, seed, n=10):
    """``(ours, transformers')`` greedy tokens for one prompt, up to transformers' eos."""
    prompt = _prompts(seed, [5])[0]
    eos = model.config.eos_token_id
    out = np.asarray(generate(cfg, params, prompt, n, temperature=0, eos_token_id=eos))[0]
    expected = _hf_greedy(torch, model, prompt, n)[0]
    return out[: expected.size], expected


def test_bf16_weights_decode_as_the_float32_model_of_their_values(torch):
    model, cfg, params = _llama()
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    half = {**half, "blocks": nj.unstack(half["blocks"])}  # split once by the caller: kept
    assert nj.unstack(half["blocks"])["stacked"] is half["blocks"]["stacked"]
    rounded = _weights_copy(model, lambda p: p.bfloat16().float())
    for seed in range(2):
        ours, expected = _greedy_pair(torch, rounded, cfg, half, seed)
        np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}")


def _int8_dequantized(p):
    """Per output channel (a torch weight's row), symmetric: the int8 scheme in NumPy."""
    import torch

    w = p.numpy()
    scale = np.abs(w).max(axis=1, keepdims=True).astype(np.float32) / np.float32(127)
    return torch.from_numpy(np.round(w / scale).astype(np.float32) * scale)


def test_int8_weight_decode_is_the_dequantized_model_and_keeps_the_float_tokens(torch):
    model, cfg, params = _llama()
    q8 = nj.finetune.quantize(params, bits=8)  # every kernel, the head too
    assert q8["blocks"]["stacked"]["mlp"]["down"]["kernel"].dtype == jnp.int8
    dequantized = _weights_copy(
        model, _int8_dequantized, lambda name: name.endswith(("proj.weight", "lm_head.weight"))
    )
    for seed in range(2):
        ours, expected = _greedy_pair(torch, dequantized, cfg, q8, seed)
        np.testing.assert_array_equal(ours, expected, err_msg=f"seed {seed}")
        # quality: on this model int8 weights keep every greedy token of the float weights
        float_tokens = _hf_greedy(torch, model, np.array(ours[None, :5]), ours.size - 5)[0]
        np.testing.assert_array_equal(ours, float_tokens, err_msg=f"seed {seed}")


@functools.cache
def _wide(family, tied):
    # wide enough that the decode products (256 x 256 and up) take nnjax's native kernel
    model = hf_model(
        family,
        hidden_size=256,
        intermediate_size=512,
        vocab_size=512,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    return model, nnjax_config(model), nnjax_params(model)


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_native_kernel_decode_of_float_bf16_and_int8_weights_equals_transformers(
    torch, monkeypatch, family, tied
):
    from nnjax.kernels import small_matmul

    if not small_matmul.available():
        pytest.skip("the native kernel is not built here (no C++ compiler, or turned off)")
    calls = []
    real = small_matmul.small_matmul

    def spy(x, w, scale=None, *, transposed=False):
        calls.append((str(jnp.result_type(w)), transposed))
        return real(x, w, scale, transposed=transposed)

    monkeypatch.setattr(small_matmul, "small_matmul", spy)
    model, cfg, params = _wide(family, tied)
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    q8 = nj.finetune.quantize(params, bits=8)
    rounded = _weights_copy(model, lambda p: p.bfloat16().float())
    dequantized = _weights_copy(
        model, _int8_dequantized, lambda name: name.endswith(("proj.weight", "lm_head.weight"))
    )
    for weights, reference, dtype in [
        (params, model, "float32"),
        (half, rounded, "bfloat16"),
        (q8, dequantized, "int8"),
    ]:
        calls.clear()
        ours, expected = _greedy_pair(torch, reference, cfg, weights, seed=7, n=12)
        np.testing.assert_array_equal(ours, expected, err_msg=dtype)
        assert (dtype, False) in calls  # the blocks' kernels
        # the head: the tied table (bfloat16 or float32: quantize leaves tables alone)
        head = ("float32" if dtype == "int8" else dtype, True) if tied else (dtype, False)
        assert head in calls, calls


def test_the_loop_stops_once_every_row_is_done(monkeypatch):
    _, cfg, params = _llama()
    prompt = _prompts(3, [5])[0]
    full = np.asarray(generate(cfg, params, prompt, 12, temperature=0))[0, 5:]
    eos = int(full[2])
    j = int(np.flatnonzero(full == eos)[0])  # the first new token that is the eos
    draws = []
    real = generate_lib.sample

    def counting(*args, **kwargs):
        jax.debug.callback(lambda: draws.append(1))  # once per token drawn at run time
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_lib, "sample", counting)
    out = np.asarray(generate(cfg, params, prompt, 12, temperature=0, eos_token_id=eos))[0, 5:]
    np.testing.assert_array_equal(out[: j + 1], full[: j + 1])
    assert (out[j + 1 :] == eos).all()  # finished: the pad id (the eos when none is given)
    assert len(draws) == j + 1  # no step after every row was done
    # while a row has not emitted the eos the loop goes on, to the last token
    two = np.concatenate([prompt, _prompts(4, [5])[0]])  # two prompts of 5
    both = np.asarray(generate(cfg, params, two, 12, temperature=0, eos_token_id=eos))[:, 5:]
    assert (both[0, j + 1 :] == eos).all() and not (both[1] == eos).any()
    assert len(draws) == j + 1 + 12  # the call above stopped early; this one did not
