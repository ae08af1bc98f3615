"""Meta-device profiles: ZeRO-3's fetch order, sizes and FLOPs, cached as compressed JSON."""

from __future__ import annotations

import pytest

from ds_tencache.model_profiles import load_or_profile
from ds_tencache.profile import Phase

pytestmark = pytest.mark.unit


def small_llama():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=100)


def test_order_sizes_flops_and_cache(tmp_path):
    batch, seq = 2, 8
    recorded = load_or_profile("toy", batch, seq, config=small_llama(), cache_dir=tmp_path)
    groups = recorded.groups
    forward = [g for g in groups if g.phase is Phase.FORWARD]
    backward = [g for g in groups if g.phase is Phase.BACKWARD]
    # One group per parameter-owning module each way; backward visits them in autograd order.
    assert len(forward) == len(backward) == 2 * 9 + 3
    assert forward[0].module == "model.embed_tokens" and backward[0].module == "lm_head"
    assert backward[-1].module == "model.embed_tokens"
    mlp = [g.module.rsplit(".", 1)[-1] for g in backward if ".layers.1.mlp." in g.module]
    assert mlp == ["down_proj", "up_proj", "gate_proj"]
    # bf16: 2 bytes per element.
    assert all(t.nbytes == 2 * t.numel and t.dtype == "torch.bfloat16"
               for t in recorded.profile.tensors.values())
    # Linear FLOPs 2*in*out*tokens forward, twice that backward; attention core 4*tokens*seq*h.
    tokens = batch * seq
    q_proj = next(i for i, g in enumerate(groups) if g.module.endswith("layers.0.self_attn.q_proj"))
    assert recorded.flops[q_proj] == 2 * 64 * 64 * tokens
    linear = sum(2 * t.numel * tokens for t in recorded.profile.tensors.values()
                 if t.name.endswith("proj.weight") or t.name == "lm_head.weight")
    attention = 2 * 4 * tokens * seq * 64
    assert sum(recorded.flops) == pytest.approx(3 * linear + 3 * attention)
    assert list(tmp_path.glob("*.json.gz"))
    again = load_or_profile("toy", batch, seq, config=small_llama(), cache_dir=tmp_path)
    assert again.flops == recorded.flops and again.groups == groups


def test_unknown_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'GPT-5'"):
        load_or_profile("GPT-5", 1, 8, cache_dir=tmp_path)
