"""Metric files and the recompilation tracer."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import metrics


def test_jsonl_and_tensorboard(tmp_path):
    with metrics.MetricWriter(tmp_path, total_steps=20, enabled=True) as writer:
        first = writer.write(
            10, {"loss": jnp.float32(2.5), "num_tokens": jnp.int32(1000), "lr": 1e-3}
        )
        second = writer.write(
            20, {"loss": jnp.float32(2.0), "num_tokens": np.int64(3000), "lr": 5e-4}
        )
    assert isinstance(first["loss"], float) and "tokens_per_sec" not in first
    # One rate: tokens per second where tokens are counted, steps per second only where not.
    assert second["tokens_per_sec"] > 0 and "steps_per_sec" not in second
    with metrics.MetricWriter(tmp_path / "steps", total_steps=2, enabled=True) as writer:
        writer.write(1, {"loss": 1.0})
        assert writer.write(2, {"loss": 1.0})["steps_per_sec"] > 0

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [10, 20]
    assert records[0]["loss"] == pytest.approx(2.5)
    assert records[1]["num_tokens"] == 3000
    assert all(isinstance(r["time"], float) for r in records)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "off", total_steps=5, enabled=False)
    assert writer.write(1, {"loss": 1.0}) == {}
    writer.close()
    assert not (tmp_path / "off").exists()


def test_non_scalar_metric_rejected(tmp_path):
    with metrics.MetricWriter(tmp_path, total_steps=5, enabled=True, progress_bar=False) as writer:
        with pytest.raises(ValueError, match="loss"):
            writer.write(1, {"loss": jnp.ones(3)})


def test_note_shapes_logs_each_new_signature_once(caplog):
    tracer = metrics.RecompileLogger()
    batch = {"input_ids": np.zeros((4, 16), np.int32)}
    with caplog.at_level(logging.INFO):
        assert tracer.note_shapes("train_step", batch)
        assert not tracer.note_shapes("train_step", {"input_ids": np.ones((4, 16), np.int32)})
        assert tracer.note_shapes("train_step", {"input_ids": np.zeros((4, 32), np.int32)})
        assert tracer.note_shapes("eval_step", batch)
    messages = [r.getMessage() for r in caplog.records if "new input shapes" in r.getMessage()]
    assert len(messages) == 3
    assert "['input_ids'][4, 32]:int32" in messages[1]
