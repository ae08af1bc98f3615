"""Training a built DeepSpeed engine on the tiny model's seeded batches, for the tier tests."""

from __future__ import annotations

from pathlib import Path


def train_steps(engine, model_dir, count: int, skip: int = 0) -> list[float]:
    """Train on batches ``skip`` to ``count`` of the seeded sequence; their losses."""
    from tiny_llama import causal_lm_batches

    losses = []
    for batch in causal_lm_batches(model_dir, 4, 64, count, seed=1)[skip:]:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def checkpoint_round_trip(engine_at, model_dir, tmp_path: Path, name: str) -> tuple[list[float], list[float]]:
    """Losses of 8 uninterrupted steps, and of steps 6-8 after a save at step 5 and a reload.

    ``engine_at(folder)`` builds a fresh engine whose swap files go under ``folder``.
    """
    uninterrupted = engine_at(tmp_path / f"{name}-a")
    expected = train_steps(uninterrupted, model_dir, 8)
    uninterrupted.destroy()
    saver = engine_at(tmp_path / f"{name}-b")
    assert train_steps(saver, model_dir, 5) == expected[:5]
    saver.save_checkpoint(str(tmp_path / f"{name}-ckpt"), tag="step5")
    saver.destroy()
    resumed = engine_at(tmp_path / f"{name}-c")
    resumed.load_checkpoint(str(tmp_path / f"{name}-ckpt"), tag="step5")
    losses = train_steps(resumed, model_dir, 8, skip=5)
    resumed.destroy()
    return expected, losses
