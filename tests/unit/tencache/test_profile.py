"""The profile: recorded from fetch events, stable-order detection, JSON round trip."""

from __future__ import annotations

import pytest

from ds_tencache.profile import OrderChangedError, Phase, Profile, ProfileRecorder, TensorInfo

pytestmark = pytest.mark.unit

TENSORS = [TensorInfo(0, 16, "torch.float32", 64, "embed.weight"),
           TensorInfo(1, 32, "torch.bfloat16", 64, "layer.weight")]


def record_step(recorder, step, order, t0, compute=0.5, fetch=0.1):
    """One step: each module fetches, waits ``fetch`` s, computes ``compute`` s."""
    now = t0
    for module, phase, params in order:
        recorder.begin_fetch(module, phase, params, now)
        now += fetch
        recorder.end_fetch(now)
        now += compute
    return recorder.end_step(step, now), now


FORWARD_BACKWARD = [("embed", Phase.FORWARD, [0]), ("layer", Phase.FORWARD, [1]),
                    ("layer", Phase.BACKWARD, [1]), ("embed", Phase.BACKWARD, [0])]


def test_recorder_measures_fetch_and_compute_times():
    recorder = ProfileRecorder()
    recorder.register_tensors(TENSORS)
    step, end = record_step(recorder, 0, FORWARD_BACKWARD, t0=10.0)
    assert [g.module for g in step.groups] == ["embed", "layer", "layer", "embed"]
    assert [g.start_s for g in step.groups] == pytest.approx([0.0, 0.6, 1.2, 1.8])
    assert all(g.fetch_s == pytest.approx(0.1) and g.wait_s == pytest.approx(0.1) for g in step.groups)
    assert all(g.compute_s == pytest.approx(0.5) for g in step.groups)
    assert step.duration_s == pytest.approx(2.4)


def test_groups_take_medians_and_skip_the_first_step():
    recorder = ProfileRecorder()
    recorder.register_tensors(TENSORS)
    _, now = record_step(recorder, 0, FORWARD_BACKWARD, 0.0, compute=5.0)  # one-off slow step
    for step, compute in enumerate((0.4, 0.5, 0.9), start=1):
        _, now = record_step(recorder, step, FORWARD_BACKWARD, now, compute=compute)
    groups = recorder.profile.groups()
    assert [g.compute_s for g in groups] == pytest.approx([0.5] * 4)


def test_changed_order_is_detected_not_used():
    recorder = ProfileRecorder()
    record_step(recorder, 0, FORWARD_BACKWARD, 0.0)
    skipped_layer = [FORWARD_BACKWARD[0], FORWARD_BACKWARD[3]]  # dynamic control flow
    changed, _ = record_step(recorder, 1, skipped_layer, 5.0)
    profile = recorder.profile
    assert not profile.is_stable()
    assert Profile(steps=profile.steps[:1]).first_divergence(changed) == 1
    with pytest.raises(OrderChangedError):
        profile.groups()


def test_same_order_has_no_divergence():
    recorder = ProfileRecorder()
    first, now = record_step(recorder, 0, FORWARD_BACKWARD, 0.0)
    second, _ = record_step(recorder, 1, FORWARD_BACKWARD, now)
    assert Profile(steps=[first]).first_divergence(second) is None


@pytest.mark.parametrize("name", ["profile.json", "profile.json.gz"])
def test_json_round_trip(tmp_path, name):
    recorder = ProfileRecorder()
    recorder.register_tensors(TENSORS)
    record_step(recorder, 0, FORWARD_BACKWARD, 0.0)
    path = tmp_path / name
    recorder.profile.to_json(path)
    loaded = Profile.from_json(path)
    assert loaded == recorder.profile


def test_loading_garbage_or_another_format_is_a_clear_error(tmp_path):
    garbage = tmp_path / "bad.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a tencache profile"):
        Profile.from_json(garbage)
    other = tmp_path / "other.json"
    other.write_text('{"format": 99, "tensors": [], "steps": []}')
    with pytest.raises(ValueError, match="profile format 99"):
        Profile.from_json(other)


def test_end_fetch_without_begin_is_an_error():
    with pytest.raises(RuntimeError, match="end_fetch without begin_fetch"):
        ProfileRecorder().end_fetch(1.0)
