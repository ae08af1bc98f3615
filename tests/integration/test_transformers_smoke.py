"""transformers loads the generated model and tokenizer and computes a sane loss."""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration


def test_transformers_forward_loss_and_generate(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = tokenizer(["The cache evicts a block.", "Every request moves the queue."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.vocab_size)
    # Random weights: the loss is close to that of a uniform guess over the vocabulary.
    assert abs(out.loss.item() - math.log(model.config.vocab_size)) < 1.0
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 5
