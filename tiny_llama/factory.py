"""Writes small Llama-architecture models, with a locally trained tokenizer, into a cache folder.

Nothing here reaches a model hub: the weights are random (seeded) and the byte-level BPE tokenizer
is trained on the synthetic corpus of :mod:`tiny_llama.corpus`. The same spec always gives the same
bytes, so tests, benchmarks and the demo can share one cached copy, and two machines agree on it.
Both ``transformers.AutoModelForCausalLM.from_pretrained(path)`` and ``vllm.LLM(model=path)`` load
the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tiny_llama import corpus

# Bump when the files written change shape, so stale cache entries are not reused.
FORMAT_VERSION = 1

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# A plain template so the chat endpoint of a server works with the tiny model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Sentences the tokenizer is trained on: enough for every merge of a 2k vocabulary, fast to train.
TOKENIZER_CORPUS_SENTENCES = 20_000


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of one generated model; every field feeds the cache key."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int  # head_dim = hidden / heads; vLLM's CPU attention needs 32..256
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    seed: int = 0

    def cache_key(self) -> str:
        blob = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def num_parameters(self) -> int:
        """Parameter count of the untied Llama this spec describes (no model needed)."""
        h, i = self.hidden_size, self.intermediate_size
        kv = h // self.num_attention_heads * self.num_key_value_heads
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * i
        norms = 2 * h
        return self.num_hidden_layers * (attention + mlp + norms) + 2 * self.vocab_size * h + h


# "tiny" keeps unit and integration tests fast (~1M parameters, every tensor under 1 MiB);
# "small" and "medium" have weight matrices above 1 MiB, the size below which stock ZeRO-Infinity
# never swaps a parameter to NVMe, so offload benchmarks move real data.
SIZES: dict[str, TinyLlamaSpec] = {
    spec.name: spec
    for spec in (
        TinyLlamaSpec("tiny", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=1024),
        TinyLlamaSpec("small", hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=2048),
        TinyLlamaSpec("medium", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=16, vocab_size=2048),
    )
}


def cache_root() -> Path:
    """``$TINY_LLAMA_CACHE``, else ``$XDG_CACHE_HOME/tiny_llama``, else ``~/.cache/tiny_llama``."""
    explicit = os.environ.get("TINY_LLAMA_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tiny_llama"


def resolve_spec(size: str | TinyLlamaSpec) -> TinyLlamaSpec:
    if isinstance(size, TinyLlamaSpec):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {sorted(SIZES)}") from None


def ensure_model(size: str | TinyLlamaSpec = "tiny", root: Path | None = None) -> Path:
    """Return the folder of the model, building it first if the cache lacks it.

    Safe under concurrent callers (test workers, a benchmark beside a test run): the build happens
    under a file lock, into a temporary folder that is renamed into place only when complete, so a
    reader never sees a half-written model.
    """
    spec = resolve_spec(size)
    root = Path(root) if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / spec.cache_key()
    if (target / "manifest.json").is_file():
        return target
    with _locked(root / f".{spec.cache_key()}.lock"):
        if (target / "manifest.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
        try:
            write_model(spec, staging)
            if target.exists():  # a leftover without a manifest is incomplete
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_model(spec: TinyLlamaSpec, folder: Path) -> None:
    """Write config, seeded random weights, tokenizer and a manifest into ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(spec)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    weights = folder / "model.safetensors"
    manifest = {
        "format": FORMAT_VERSION,
        "spec": dataclasses.asdict(spec),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def build_tokenizer(spec: TinyLlamaSpec):
    """Train a byte-level BPE tokenizer on the synthetic corpus; returns a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.sentences(spec.seed, TOKENIZER_CORPUS_SENTENCES), trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )


def causal_lm_batches(model_dir: Path, batch_size: int, seq_len: int, count: int, seed: int = 1):
    """``count`` batches of token ids (each ``(batch_size, seq_len)``) from the synthetic corpus.

    Training tests and benchmarks use these as inputs and labels, so stock and patched runs see
    exactly the same data for the same seed.
    """
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    needed = batch_size * seq_len * count
    ids: list[int] = []
    chunk = 0
    while len(ids) < needed:
        # one long text on purpose; verbose=False drops the "longer than the model" notice
        ids.extend(tokenizer(corpus.text(seed * 1_000_003 + chunk, 2_000), verbose=False)["input_ids"])
        chunk += 1
    flat = torch.tensor(ids[:needed], dtype=torch.long)
    return list(flat.view(count, batch_size, seq_len))
