"""The tiny-model factory: deterministic, offline, loadable, with an honest parameter count."""

from __future__ import annotations

import json
import threading

import pytest

from tiny_llama import SIZES, TinyLlamaSpec, corpus, ensure_model
from tiny_llama.factory import FORMAT_VERSION, resolve_spec

pytestmark = pytest.mark.unit

# Small enough to build in about a second, in a private cache folder.
MICRO = TinyLlamaSpec("micro", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=512)


def test_corpus_is_deterministic_and_seed_dependent():
    assert corpus.text(3, 50) == corpus.text(3, 50)
    assert corpus.text(3, 50) != corpus.text(4, 50)


def test_same_spec_gives_identical_bytes_in_two_caches(tmp_path):
    first = ensure_model(MICRO, root=tmp_path / "a")
    second = ensure_model(MICRO, root=tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_other_seed_gives_other_weights(tmp_path):
    base = json.loads((ensure_model(MICRO, root=tmp_path) / "manifest.json").read_text())
    reseeded = TinyLlamaSpec(**{**base["spec"], "seed": 1})
    other = json.loads((ensure_model(reseeded, root=tmp_path) / "manifest.json").read_text())
    assert other["weights_sha256"] != base["weights_sha256"]


def test_manifest_counts_parameters_like_the_spec(tmp_path):
    manifest = json.loads((ensure_model(MICRO, root=tmp_path) / "manifest.json").read_text())
    assert manifest["format"] == FORMAT_VERSION
    assert manifest["num_parameters"] == MICRO.num_parameters()


def test_size_table_matches_the_issue():
    assert 0.5e6 < SIZES["tiny"].num_parameters() < 2e6
    # Stock ZeRO-Infinity never swaps a parameter under 1 MiB; the offload sizes must exceed it in bf16.
    for name in ("small", "medium"):
        spec = SIZES[name]
        assert spec.hidden_size * spec.intermediate_size * 2 > 1 << 20, name


def test_tokenizer_round_trips_text_and_code(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_model(MICRO, root=tmp_path))
    sample = "The cache evicts 42 blocks!\ndef step(x):\n    return x + 1\n"
    ids = tokenizer(sample)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == sample
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>hi\n<|assistant|>"


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    target = tmp_path / MICRO.cache_key()
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"truncated")  # a crash mid-write, no manifest
    folder = ensure_model(MICRO, root=tmp_path)
    assert folder == target
    assert (folder / "manifest.json").is_file()
    assert (folder / "model.safetensors").stat().st_size > 1000


def test_concurrent_callers_share_one_build(tmp_path):
    results = []
    workers = [threading.Thread(target=lambda: results.append(ensure_model(MICRO, root=tmp_path)))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [MICRO.cache_key()]


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown tiny model size 'huge'.*'medium', 'small', 'tiny'"):
        resolve_spec("huge")
