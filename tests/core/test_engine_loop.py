"""The stepping thread without Ray: typed commands in, finished requests, failures and previews
out through the listener, a failing step failing only its engine's requests."""

from __future__ import annotations

import logging
import threading
import time
import weakref

import pytest
import torch

from undiffuse import DiffusionModel, ModelConfig, ScheduleConfig, UNetConfig
from undiffuse.engine import DenoisingEngine, EngineConfig, Request
from undiffuse.engine_loop import Add, Cancel, EngineLoop, SetMaxBatch
from undiffuse.schedule import NoiseSchedule

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


class Upsample(torch.nn.Module):
    """A latent model's decoder: 8 x 8 latents to 16 x 16 images."""

    def forward(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=2).tanh()


def latent_engine(max_batch: int = 16, **config) -> DenoisingEngine:
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=200))
    model = DiffusionModel(
        RowWise(), schedule, image_size=16, channels=1, num_classes=3, decoder=Upsample(), latent_shape=(1, 8, 8)
    )
    return DenoisingEngine(model, EngineConfig(max_batch=max_batch, latency_slack=None, **config))


def fitting(decode, images: int, calls: list[int]):
    """decode, recording each call's images in `calls`, that runs out of device memory (as a
    CUDA decoder does; the error exists in CPU builds) on a call of more than `images`."""

    def decoder(z):
        calls.append(z.shape[0])
        if z.shape[0] > images:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(z)

    return decoder


def quiet_log() -> logging.Logger:
    """A logger that keeps no record: pytest's log capture keeps each record, and with it the
    traceback of a logged error."""
    log = logging.getLogger("test_engine_loop.quiet")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


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


def test_gaps_are_the_host_time_between_steps_while_work_continues():
    """One gap per step after the first of a busy stretch, none across an idle wait; a slow
    listener (host work between steps) shows in them."""

    class SlowListener(Recorder):
        def finished(self, request_id, finished) -> None:
            super().finished(request_id, finished)
            time.sleep(0.02)

    loop = EngineLoop({"m": engine()}, SlowListener(), publish_every=0.0)
    loop.submit(Add("m", request("a", steps=4)))
    loop.submit(Add("m", request("b", steps=6)))
    drain(loop)  # 6 rounds of steps, then idle
    assert len(loop.gaps) == 5
    gaps = list(loop.gaps)
    assert gaps[3] >= 0.02 and max(gaps[:3]) < 0.02  # the step after a finished, not before
    loop.submit(Add("m", request("c", steps=2)))
    drain(loop)
    assert len(loop.gaps) == 5 + 1  # the idle wait in between is not a gap


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
    gaps = len(loop.gaps)
    loop.run_once()  # the step after a failed one: no gap measured from a step that did not end
    assert len(loop.gaps) == gaps
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


def test_after_running_out_of_memory_the_cache_is_emptied_once_the_failed_steps_tensors_are_gone(monkeypatch):
    """The failed step's frames (held by the error's traceback) and the canceled rows are gone
    when the cache is emptied, also while the listener still holds the error, which keeps its
    message but not its traceback (the log has it)."""
    listener = Recorder()
    broken = engine(max_batch=64)
    held: list[weakref.ref] = []

    def out_of_memory(x, t, labels):
        activations = torch.empty(x.shape[0], 4096)
        held.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    broken.network = out_of_memory
    emptied: list[tuple[bool, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append((held[0]() is None, broken.resident_rows)))
    loop = EngineLoop({"broken": broken}, listener, min_batch=8, log=quiet_log())
    loop.submit(Add("broken", request("x")))
    loop.run_once()
    assert emptied == [(True, 0)]
    error = listener.errors["x"]
    assert isinstance(error, torch.cuda.OutOfMemoryError) and "simulated" in str(error)
    assert error.__traceback__ is None and broken.config.max_batch == 32


def test_a_decoder_out_of_memory_halves_the_decode_chunk_not_max_batch_and_fails_nothing():
    """A decoder that fits 2 images per call, set to 8: the step that finishes 8 rows decodes
    them 2 at a time after two failed calls, the shards succeed, and max_batch stays as it was."""
    listener = Recorder()
    e = latent_engine(max_decode_batch=8, invariant_rows=0)
    calls: list[int] = []
    e.decoder = fitting(e.decoder, 2, calls)
    loop = EngineLoop({"m": e}, listener, min_batch=4, log=quiet_log())
    loop.submit(Add("m", request("a", count=4)))
    loop.submit(Add("m", request("b", count=4)))
    drain(loop)
    assert set(listener.done) == {"a", "b"} and not listener.errors and loop.failed_steps == 0
    assert listener.done["a"].pixels().shape == (4, 16, 16, 1)
    assert calls == [8, 4, 2, 2, 2, 2] and e.decode_batch == 2 and e.config.max_batch == 16


def test_set_max_batch_sizes_every_network_less_every_decoders_memory_then_every_decoder(monkeypatch):
    """Every decoder is measured first (so a set chunk is reserved from the first sizing on),
    every network is sized from the memory less what all decoders take at their chunks and
    warmed up, then every decoder warmed up (sized from what is left less the other decoders'
    memory): no decoder is sized between two networks. The decoders' bytes per image stand for
    what CUDA measures."""
    # whole batches: the decode chunks are max_decode_batch (batch-invariant decoding takes one image)
    first, pixel, second = (
        latent_engine(max_decode_batch=4, invariant_rows=0),
        engine(),
        latent_engine(max_decode_batch=2, invariant_rows=0),
    )
    assert first.decode_reserved_bytes == 0  # not measured yet: the first sizing measures it
    measured = {"first": 1000, "second": 300}  # what _measure_decode finds on CUDA
    events: list[tuple] = []

    def sizing(model, setting, dtype, *, decode_reserved_bytes):
        name = {id(e.model): n for n, e in engines.items()}[id(model)]
        events.append(("size", name, decode_reserved_bytes))
        return setting

    engines = {"first": first, "pixel": pixel, "second": second}

    def measure(engine, name):
        events.append(("measure", name))
        if name in measured:
            engine._decode_bytes = measured[name]

    for name, e in engines.items():
        monkeypatch.setattr(e, "measure_decoder", lambda e=e, n=name: measure(e, n))
        monkeypatch.setattr(e, "warm_up", lambda s, log, decoder, n=name: events.append(("network", n, decoder)))
        monkeypatch.setattr(
            e,
            "warm_up_decoder",
            lambda s, log, reserved_elsewhere, n=name: events.append(("decoder", n, reserved_elsewhere)),
        )
    monkeypatch.setattr("undiffuse.engine_loop.max_batch_for_memory", sizing)
    loop = EngineLoop(engines, Recorder(), min_batch=4)
    command = SetMaxBatch(12)
    loop.submit(command)
    loop.run_once()
    assert command.done.result(timeout=0) is None
    assert events == [
        ("measure", "first"),
        ("measure", "pixel"),
        ("measure", "second"),
        ("size", "first", 4600),
        ("network", "first", False),
        ("size", "pixel", 4600),
        ("network", "pixel", False),
        ("size", "second", 4600),
        ("network", "second", False),
        ("decoder", "first", 600),
        ("decoder", "second", 4000),
    ]
    assert [e.config.max_batch for e in engines.values()] == [12, 12, 12]
    assert (first.decode_reserved_bytes, pixel.decode_reserved_bytes) == (4000, 0)


def test_a_failed_decoder_warm_up_restores_max_batch_and_the_decode_chunk():
    e = latent_engine(max_decode_batch=4, invariant_rows=0)

    def sized_then_broken(max_seconds, log, reserved_elsewhere):
        e.set_decode_batch(2)  # as a decoder sized by memory would be
        raise RuntimeError("no kernel for this decode bucket")

    e.warm_up_decoder = sized_then_broken
    loop = EngineLoop({"m": e}, Recorder(), min_batch=4, log=quiet_log())
    command = SetMaxBatch(8)
    loop.submit(command)
    loop.run_once()
    with pytest.raises(RuntimeError, match="no kernel"):
        command.done.result(timeout=0)
    assert (e.config.max_batch, e.decode_batch) == (16, 4)


def test_a_compiled_decoder_bucket_that_runs_out_of_memory_at_warm_up_halves_the_chunk():
    """Warming up a compiled decoder's buckets, one that does not fit halves the chunk as a
    decode does and the larger buckets are skipped: the warm-up (and so the replica's start)
    goes on. (The engine is marked compiled with an eager decoder: the bucket loop is the same.)"""
    e = latent_engine(max_decode_batch=8, invariant_rows=0)
    e.compiled = True
    e._set_decode_batch(8)  # buckets 1, 2, 4, 8
    calls: list[int] = []
    e.decoder = fitting(Upsample(), 2, calls)
    e.warm_up_decoder(60, log=None)
    assert calls == [1, 2, 4] and e.decode_batch == 2 and e.decode_buckets == (1, 2)
