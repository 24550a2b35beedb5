"""The stepping thread without Ray: typed commands in, finished requests, failures and previews
out through the listener, a failing step failing only its engine's requests."""

from __future__ import annotations

import threading

import pytest
import torch

from undiffuse import DiffusionModel, ModelConfig, ScheduleConfig, UNetConfig
from undiffuse.engine import DenoisingEngine, EngineConfig, Request
from undiffuse.engine_loop import Add, Cancel, EngineLoop, SetMaxBatch

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=3)


class RowWise(torch.nn.Module):
    def forward(self, x, t, labels=None):
        return torch.tanh(x * 0.9 + (t.float() / 200 + labels.float()).view(-1, 1, 1, 1))


class Recorder:
    """A Listener that keeps what it hears."""

    def __init__(self) -> None:
        self.done: dict = {}
        self.errors: dict = {}
        self.preview_steps: list = []

    def finished(self, request_id, finished) -> None:
        self.done[request_id] = finished

    def failed(self, request_id, error) -> None:
        self.errors[request_id] = error

    def previews(self, previews) -> None:
        self.preview_steps += [(p.id, p.step) for p in previews]


def engine(max_batch: int = 16) -> DenoisingEngine:
    model = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    return DenoisingEngine(model, EngineConfig(max_batch=max_batch, latency_slack=None, keep_samples=True))


def request(rid, steps: int = 4, count: int = 2, **kw) -> Request:
    return Request(rid, "a", seed=1, start=0, count=count, steps=steps, labels=[0] * count, **kw)


def drain(loop: EngineLoop, limit: int = 100) -> None:
    for _ in range(limit):
        if not loop.run_once():
            return
    raise AssertionError("the loop did not go idle")


def test_added_requests_finish_and_are_reported_with_progress_and_timings():
    listener = Recorder()
    loop = EngineLoop({"m": engine()}, listener, publish_every=0.0)
    loop.submit(Add("m", request("r1", preview_every=2)))
    loop.submit(Add("m", request("r2", steps=6)))
    assert loop.run_once()
    assert loop.progress == {"r1": 1, "r2": 1}
    drain(loop)
    assert set(listener.done) == {"r1", "r2"} and not listener.errors
    assert listener.done["r1"].pixels().shape == (2, 8, 8, 1)
    assert listener.preview_steps == [("r1", 2)]
    assert [rows for _, _, rows, _ in loop.timings] == [4] * 4 + [2] * 2
    assert loop.progress == {} and loop.failed_steps == 0


def test_a_refused_request_fails_alone_and_a_cancel_removes_rows_at_the_next_step():
    listener = Recorder()
    loop = EngineLoop({"m": engine()}, listener, publish_every=0.0)
    loop.submit(Add("m", request("bad", steps=500)))  # more steps than the model has
    loop.submit(Add("other-model", request("lost")))
    loop.submit(Add("m", request("keep", steps=5)))
    loop.submit(Add("m", request("drop", steps=5)))
    loop.run_once()
    assert set(listener.errors) == {"bad", "lost"}
    assert "cannot run shard" in str(listener.errors["bad"])
    loop.submit(Cancel("m", "drop"))
    loop.submit(Cancel("unknown-model", "drop"))  # ignored
    loop.run_once()
    assert loop.progress == {"keep": 2}
    drain(loop)
    assert set(listener.done) == {"keep"}


def test_a_failing_step_fails_its_engines_requests_and_an_out_of_memory_error_halves_max_batch():
    listener = Recorder()
    broken, fine = engine(max_batch=64), engine()

    def out_of_memory(x, t, labels):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    broken.network = out_of_memory
    loop = EngineLoop({"fine": fine, "broken": broken}, listener, min_batch=8)  # broken steps last
    loop.submit(Add("broken", request("x")))
    loop.submit(Add("fine", request("y")))
    loop.run_once()
    assert set(listener.errors) == {"x"} and isinstance(listener.errors["x"], torch.cuda.OutOfMemoryError)
    assert broken.idle and broken.config.max_batch == 32 and loop.failed_steps == 1
    drain(loop)
    assert set(listener.done) == {"y"} and loop.failed_steps == 0


def test_set_max_batch_applies_between_steps_and_resolves_its_future():
    listener = Recorder()
    e = engine()
    loop = EngineLoop({"m": e}, listener, min_batch=4, warmup_seconds=5)
    command = SetMaxBatch(2)  # below the least batch: raised to it
    loop.submit(command)
    loop.run_once()
    assert command.done.result(timeout=0) is None
    assert e.config.max_batch == 4 and set(e.step_time) == set(e.buckets)


def test_set_max_batch_reports_a_failed_warm_up_and_keeps_the_old_size():
    e = engine()

    def broken(x, t, labels):
        raise RuntimeError("no kernel for this bucket")

    e.network = broken
    loop = EngineLoop({"m": e}, Recorder())
    command = SetMaxBatch(32)
    loop.submit(command)
    loop.run_once()
    with pytest.raises(RuntimeError, match="no kernel"):
        command.done.result(timeout=0)
    assert e.config.max_batch == 16


def test_run_steps_on_its_thread_until_stopped():
    listener = Recorder()
    loop = EngineLoop({"m": engine()}, listener)
    stopping = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stopping,), daemon=True)
    thread.start()
    loop.submit(Add("m", request("r")))
    for _ in range(200):
        if "r" in listener.done:
            break
        threading.Event().wait(0.02)
    stopping.set()
    loop.wake()
    thread.join(timeout=5)
    assert "r" in listener.done and not thread.is_alive()
