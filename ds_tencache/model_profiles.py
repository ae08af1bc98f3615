"""Fetch profiles of 7B-13B models taken on the meta device: no weights, no GPU, a few seconds.

The simulator needs what ZeRO-3 would see while training a large model: which parameters each
sub-module fetches, in which order, how big they are, and how much compute separates the fetches.
All of that follows from the architecture alone, so the model is built on PyTorch's ``meta``
device (shapes and dtypes, no storage) from its public hyperparameters, and one forward and one
backward pass are run on meta tensors with module hooks recording the order:

- **One fetch group per invocation of a sub-module that owns parameters**, with the module's own
  parameters (``recurse=False``), sorted by id. This is what ``deepspeed_hooks.TencacheCoordinator``
  records on a real engine: ZeRO-3 hooks every sub-module and gathers its direct parameters.
  Ids follow ``model.parameters()`` order, the order ZeRO-3 gives out ``ds_id``; a tied weight
  (an LM head sharing the embedding) is one id used by two groups, as in ZeRO-3.
- **Forward order** from forward pre-hooks; **backward order** from hooks on each module's output
  gradient, i.e. autograd's real order (inside an MLP it is down, up, gate: not simply the
  reverse), the moment ZeRO-3's pre-backward function fetches. Backward on meta tensors works for
  every model here, so no order is derived by reversal.
- **FLOPs per group** (``flops[g]``, parallel to the groups). Counted: every ``nn.Linear`` at
  ``2 * in * out * tokens`` forward and twice that backward (input and weight gradients), and
  the attention core per layer, ``QK^T`` plus ``AV`` = ``4 * tokens * seq * hidden`` forward and
  twice that backward, at full (not causal-halved) length as dense SDPA computes it. The attention
  core's forward is added to the group running just before the output projection, its backward to
  the output projection's backward group: the compute between those fetches. Not counted:
  embeddings, norms, activations, softmax, loss: memory-bound and under 1% of the total.
- Training weights are bf16 (2 bytes), as in mixed-precision ZeRO-3.

``FetchGroup.compute_s`` stays 0: the simulator turns FLOPs into time under a hardware model.
Profiles are cached as compressed JSON (``Profile.to_json`` to ``.json.gz``) plus a small sidecar
with the FLOPs and the model's shape, keyed by model, batch, sequence length and dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ds_tencache.profile import FetchGroup, Phase, Profile, StepProfile, TensorInfo

# Bump when what is recorded changes, so stale cache entries are not reused.
PROFILE_CACHE_FORMAT = 1
# Backward of a Linear computes the input gradient and the weight gradient: two forward-sized GEMMs.
BACKWARD_FLOP_FACTOR = 2
# Class-name suffix of the attention modules of every architecture here (OPTAttention,
# LlamaAttention, BloomAttention, FalconAttention): where the attention core runs.
ATTENTION_CLASS_SUFFIX = "Attention"


def _opt_6_7b():
    from transformers import OPTConfig

    # facebook/opt-6.7b config.json on the Hugging Face hub; Zhang et al. 2022, Table 1.
    return OPTConfig(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096,
                     do_layer_norm_before=True, tie_word_embeddings=True)


def _opt_13b():
    from transformers import OPTConfig

    # facebook/opt-13b config.json; Zhang et al. 2022, Table 1.
    return OPTConfig(hidden_size=5120, ffn_dim=20480, num_hidden_layers=40, num_attention_heads=40,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=5120,
                     do_layer_norm_before=True, tie_word_embeddings=True)


def _bloom_7b1():
    from transformers import BloomConfig

    # bigscience/bloom-7b1 config.json (n_embed 4096, n_layer 30, n_head 32, vocab 250880).
    return BloomConfig(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880,
                       tie_word_embeddings=True)


def _falcon_7b():
    from transformers import FalconConfig

    # tiiuae/falcon-7b config.json: hidden 4544, 32 layers, 71 heads, multi-query (1 KV head),
    # parallel attention/MLP, no biases, rotary positions, vocab 65024.
    return FalconConfig(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
                        num_kv_heads=1, multi_query=True, parallel_attn=True,
                        new_decoder_architecture=False, bias=False, alibi=False,
                        vocab_size=65024, tie_word_embeddings=True)


def _llama_2_7b():
    from transformers import LlamaConfig

    # meta-llama/Llama-2-7b-hf config.json; Touvron et al. 2023, Table 1.
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False)


def _llama_2_13b():
    from transformers import LlamaConfig

    # meta-llama/Llama-2-13b-hf config.json; Touvron et al. 2023, Table 1.
    return LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       max_position_embeddings=4096, tie_word_embeddings=False)


# Public hyperparameters, written here because no model hub is reachable.
MODEL_CONFIGS: dict[str, Callable] = {
    "OPT-6.7B": _opt_6_7b,
    "BLOOM-7B1": _bloom_7b1,
    "Falcon-7B": _falcon_7b,
    "Llama-2-7B": _llama_2_7b,
    "Llama-2-13B": _llama_2_13b,
    "OPT-13B": _opt_13b,
}


@dataclass(frozen=True)
class ModelShape:
    """What the simulator needs beyond the fetch order: activation memory depends on these."""

    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    batch: int
    seq_len: int
    num_parameters: int


@dataclass
class ModelProfile:
    """A one-step fetch profile, its FLOPs per group (parallel to the groups) and the shape."""

    name: str
    profile: Profile
    flops: list[float]
    shape: ModelShape

    @property
    def groups(self) -> list[FetchGroup]:
        return self.profile.steps[0].groups


def profile_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ds_tencache/profiles``, else ``~/.cache/ds_tencache/profiles``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ds_tencache" / "profiles"


def load_or_profile(name: str, batch: int, seq_len: int, dtype: str = "bfloat16",
                    cache_dir: Path | None = None, config=None) -> ModelProfile:
    """The cached profile of ``name`` at this batch and length, recording it on a miss.

    ``config`` overrides the built-in hyperparameters (used for the tiny calibration model,
    whose config is read from its local folder).
    """
    folder = Path(cache_dir) if cache_dir is not None else profile_cache_dir()
    key = f"{name}-b{batch}-s{seq_len}-{dtype}-v{PROFILE_CACHE_FORMAT}"
    profile_path, meta_path = folder / f"{key}.json.gz", folder / f"{key}.meta.json"
    if profile_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return ModelProfile(name, Profile.from_json(profile_path), meta["flops"],
                            ModelShape(**meta["shape"]))
    recorded = record_profile(name, batch, seq_len, dtype, config)
    folder.mkdir(parents=True, exist_ok=True)
    # Written under temporary names then renamed: a concurrent reader never sees half a file.
    for path, write in ((profile_path, recorded.profile.to_json),
                        (meta_path, lambda p: Path(p).write_text(json.dumps(
                            {"flops": recorded.flops, "shape": asdict(recorded.shape)})))):
        partial = path.with_name(f".{os.getpid()}.{path.name}")  # same suffix: .gz stays gzip
        write(partial)
        partial.replace(path)
    return recorded


def record_profile(name: str, batch: int, seq_len: int, dtype: str = "bfloat16",
                   config=None) -> ModelProfile:
    """Build the model on the meta device and record one training step's fetch groups."""
    import torch
    from transformers import AutoModelForCausalLM

    if config is None:
        if name not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODEL_CONFIGS)}")
        config = MODEL_CONFIGS[name]()
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.train()

    ids: dict[int, int] = {}  # id(parameter) -> ds_id-like index, in model.parameters() order
    tensors: dict[int, TensorInfo] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for index, param in enumerate(model.parameters()):
        ids[id(param)] = index
        tensors[index] = TensorInfo(index, param.numel(), str(param.dtype),
                                    param.numel() * param.element_size(), names[id(param)])

    tokens = batch * seq_len
    groups: list[FetchGroup] = []
    flops: list[float] = []

    def add_group(module: torch.nn.Module, label: str, phase: Phase) -> None:
        own = sorted(ids[id(p)] for p in module.parameters(recurse=False))
        groups.append(FetchGroup(label, phase, tuple(own), 0.0, 0.0, 0.0, 0.0))
        linear = (2.0 * module.in_features * module.out_features * tokens
                  if isinstance(module, torch.nn.Linear) else 0.0)
        flops.append(linear if phase is Phase.FORWARD else BACKWARD_FLOP_FACTOR * linear)

    attention_forward_start: list[int] = []
    attention_core_flops = 4.0 * tokens * seq_len * _hidden_size(config)  # QK^T + AV, one layer

    def attention_pre(module, args, kwargs=None):
        attention_forward_start.append(len(groups))

    def attention_post(module, args, output):
        start = attention_forward_start.pop()
        inside = [g for g in range(start, len(groups)) if groups[g].phase is Phase.FORWARD]
        # The core runs after the projections and before the output projection (the last group).
        flops[inside[-2] if len(inside) > 1 else inside[-1]] += attention_core_flops
        output_projection = groups[inside[-1]].module
        backward_core[output_projection] = BACKWARD_FLOP_FACTOR * attention_core_flops

    backward_core: dict[str, float] = {}  # output projection module -> backward attention FLOPs
    handles = []
    for label, module in model.named_modules():
        if list(module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, label=label: add_group(m, label, Phase.FORWARD)))
            handles.append(module.register_forward_hook(
                lambda m, a, out, label=label: _on_output_gradient(
                    out, lambda: add_group(m, label, Phase.BACKWARD))))
        if type(module).__name__.endswith(ATTENTION_CLASS_SUFFIX):
            handles.append(module.register_forward_pre_hook(attention_pre))
            handles.append(module.register_forward_hook(attention_post))

    input_ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    for handle in handles:
        handle.remove()

    for g, group in enumerate(groups):
        if group.phase is Phase.BACKWARD and group.module in backward_core:
            flops[g] += backward_core[group.module]
    shape = ModelShape(hidden_size=_hidden_size(config), num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads, vocab_size=config.vocab_size,
                       batch=batch, seq_len=seq_len, num_parameters=sum(t.numel for t in tensors.values()))
    profile = Profile(tensors=tensors, steps=[StepProfile(step=0, groups=groups, duration_s=0.0)])
    return ModelProfile(name, profile, flops, shape)


def _on_output_gradient(output, record: Callable[[], None]) -> None:
    """Call ``record`` once, when the first gradient of a module's output arrives.

    That is the moment ZeRO-3 fetches a module for backward: its forward post-hook wraps the
    outputs in a function whose backward gathers the parameters (``PreBackwardFunctionForModule``).
    Tensor hooks are used rather than full backward hooks, which break modules that modify their
    output in place (Falcon's parallel attention adds into the MLP output).
    """
    import torch

    tensors = [output] if isinstance(output, torch.Tensor) else [
        t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
    fired = [False]

    def once(grad):
        if not fired[0]:
            fired[0] = True
            record()

    for tensor in tensors:
        if tensor.requires_grad:
            tensor.register_hook(once)


def _hidden_size(config) -> int:
    return int(config.hidden_size)
