"""nnjax.eval: the lm-evaluation-harness model against the harness's own Hugging Face backend.

One tiny random Llama saved by transformers (with a BPE tokenizer trained here) is
evaluated twice on local task YAMLs (a multiple-choice task, a rolling-perplexity task,
a generation task with stop sequences): through ``lm_eval.models.huggingface.HFLM``
and through ``nnjax.eval.NNJaxLM``. Per-request log-likelihoods must agree to 1e-4,
the metrics exactly, the generations character for character. The perplexity helper
is checked against the same transformers model scored by hand in torch.
"""

import json
import math

import numpy as np
import pytest

from tests import hf_tiny

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "The sea was calm and the night was long and the stars were bright.",
]
MC = [
    {"question": "The quick brown fox", "choices": [" jumps", " sleeps", " runs"], "answer": 0},
    {"question": "To be, or not to", "choices": [" be", " see", " go"], "answer": 0},
    {"question": "All that glitters is", "choices": [" gold", " not gold", " lost"], "answer": 1},
    {"question": "A journey of a", "choices": [" thousand", " single", " long"], "answer": 0},
    {"question": "The sea was", "choices": [" calm", " bright", " long"], "answer": 0},
]
GEN = [{"prompt": t[:18], "target": t[18:30]} for t in TEXT]

TASKS = {
    "tiny_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    },
    "tiny_rolling": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    },
    "tiny_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["e", "\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("eval")
    folder = root / "model"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    hf_tiny.build("llama", folder, vocab_size=300)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = {
        "tiny_mc": MC,
        "tiny_rolling": [{"text": " ".join(TEXT[i:] + TEXT[:i])} for i in range(3)],
        "tiny_gen": GEN,
    }
    tasks = root / "tasks"
    tasks.mkdir()
    for name, spec in TASKS.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in data[name]))
        spec = {"task": name, "dataset_path": "json", "test_split": "test", **spec}
        spec["dataset_kwargs"] = {"data_files": {"test": str(path)}}
        (tasks / f"{name}.yaml").write_text(json.dumps(spec))  # YAML reads JSON
    return folder, tasks


def _evaluate(model, tasks):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        tasks=sorted(TASKS),
        # only the local tasks: indexing the harness's bundled ones reads ~13,000 YAMLs
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def _responses(results, task):
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow  # two harness runs over three small tasks: ~30 s on 2 cores
def test_same_loglikelihoods_metrics_and_generations_as_the_hf_backend(setup, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from nnjax.eval import NNJaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, tasks = setup
    # max_length 16: the rolling texts span several windows
    hf = _evaluate(HFLM(pretrained=str(folder), batch_size=4, device="cpu", max_length=16), tasks)
    ours = _evaluate(NNJaxLM(folder, batch_size=4, max_length=16, length_bucket=8), tasks)

    ref, got = _responses(hf, "tiny_mc"), _responses(ours, "tiny_mc")
    assert len(ref) == len(MC) and len(ref[0]) == 3
    for r_doc, g_doc in zip(ref, got, strict=True):
        for (r,), (g,) in zip(r_doc, g_doc, strict=True):
            assert float(g[0]) == pytest.approx(float(r[0]), abs=1e-4)
            assert bool(g[1]) == bool(r[1])
    ref, got = _responses(hf, "tiny_rolling"), _responses(ours, "tiny_rolling")
    flat = lambda rs: [float(np.ravel(np.asarray(r, dtype=object))[0]) for r in rs]
    assert flat(got) == pytest.approx(flat(ref), abs=1e-4)
    for task in ("tiny_mc", "tiny_rolling", "tiny_gen"):
        for metric, value in hf["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-6), metric
    ref, got = _responses(hf, "tiny_gen"), _responses(ours, "tiny_gen")
    assert got == ref  # the same text, cut at the same stop sequence
    assert any(len(r[0]) < 6 for r in ref)  # some generations were cut by "e" or "\n"


def test_perplexity_matches_transformers_by_hand(setup):
    import nnjax as nj
    from nnjax.eval import perplexity

    folder, _ = setup
    config, params = nj.models.hf.from_pretrained(folder)
    tok = nj.models.hf.load_tokenizer(folder)
    text = folder.parent / "text.txt"
    text.write_text(" ".join(TEXT))
    got = perplexity(config, params, text, tokenizer=tok, seq_len=10, batch_size=3)

    ids = tok.encode(" ".join(TEXT), add_special_tokens=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    nll, n = 0.0, 0
    for start in range(0, len(ids) - 1, 10):
        window = torch.tensor([ids[start : start + 11]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window[:, :-1]).logits[0], -1)
        nll -= float(logp.gather(1, window[0, 1:, None]).sum())
        n += window.shape[1] - 1
    assert got["tokens"] == n == len(ids) - 1
    assert got["loss"] == pytest.approx(nll / n, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    with pytest.raises(nj.DataError, match="needs tokenizer="):
        perplexity(config, params, text)
    assert np.isfinite(perplexity(config, params, np.asarray(ids), seq_len=8)["loss"])


@pytest.mark.slow  # one harness run: ~15 s
def test_command_line(setup, capsys, monkeypatch):
    from nnjax.eval.__main__ import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, tasks = setup
    argv = ["--model-dir", str(folder), "--tasks", "tiny_mc", "--include-path", str(tasks)]
    argv += ["--only-include-path"]
    results = main([*argv, "--batch-size", "4", "--max-length", "16"])
    assert "tiny_mc" in capsys.readouterr().out
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1


def test_bad_arguments_are_refused_before_work(setup):
    import nnjax as nj
    from nnjax.eval import NNJaxLM

    folder, _ = setup
    with pytest.raises(nj.ArgumentError, match="expected model_dir=, or config="):
        NNJaxLM()
    lm = NNJaxLM(folder, batch_size=2, max_length=16)
    with pytest.raises(nj.ArgumentError, match="max_gen_toks: expected fewer than max_length"):
        lm._generate_batch(["The sea"], {"until": ["\n"], "max_gen_toks": 16})
