"""The stepping thread: the engines of one process, stepped in turn, with typed commands in.

A serving process (the Denoiser replica) runs one `DenoisingEngine` per model on one thread
that does nothing but step; everything else (the event loop, Redis, encoding) talks to it
through commands and hears back through a `Listener`:

    loop = EngineLoop({"mnist": engine}, listener, min_batch=32)
    threading.Thread(target=loop.run, args=(stopping,), daemon=True).start()
    loop.submit(Add("mnist", request))          # joins the batch at a coming step
    loop.submit(Cancel("mnist", request.id))    # its rows leave at the next step
    command = SetMaxBatch(256); loop.submit(command); command.done.result()

Between steps the loop applies every queued command, then steps each engine with work once.
A step that raises fails that engine's requests (the listener hears `failed` for each) and the
loop goes on; an out-of-memory error also halves the engine's max_batch (never below
`min_batch`). Nothing here waits on anything but the step itself; progress and step timings
are published for other threads to read (`progress`, `timings`, `rates`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from undiffuse.engine import DenoisingEngine, Finished, Preview, Request, max_batch_for_memory


@dataclass(frozen=True)
class Add:
    """Queue `request` on the engine of `model`; a request the engine refuses fails alone."""

    model: str
    request: Request


@dataclass(frozen=True)
class Cancel:
    """Drop a request: its rows leave the batch at the next step (unknown ones are ignored)."""

    model: str
    request_id: Hashable


@dataclass(frozen=True)
class SetMaxBatch:
    """Every engine's rows per network call: `setting`, capped by free device memory (never
    below the loop's min_batch), then every bucket warmed up. `done` resolves when applied, or
    raises why not (an engine whose warm-up failed keeps its old size)."""

    setting: int
    done: Future = field(default_factory=Future, compare=False)


Command = Add | Cancel | SetMaxBatch


class Listener(Protocol):
    """What the loop reports, called on the loop's thread (hand over to your own; be quick)."""

    def finished(self, request_id: Hashable, finished: Finished) -> None: ...

    def failed(self, request_id: Hashable, error: Exception) -> None: ...

    def previews(self, previews: list[Preview]) -> None: ...


class EngineLoop:
    """Steps engines in turn and applies commands between steps (see the module docs).

    min_batch: the least max_batch an engine is given (a guided shard's rows); warmup_seconds:
    warm-up budget after a SetMaxBatch; publish_every: seconds between progress snapshots.
    """

    def __init__(
        self,
        engines: dict[str, DenoisingEngine],
        listener: Listener,
        *,
        min_batch: int = 1,
        warmup_seconds: float = 120.0,
        publish_every: float = 0.125,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engines = engines
        self.listener = listener
        self.min_batch = min_batch
        self.warmup_seconds = warmup_seconds
        self.publish_every = publish_every
        self.log = log or logging.getLogger(__name__)
        self._clock = clock
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._last_publish = 0.0
        self.progress: dict[Hashable, int] = {}  # steps done per request: a snapshot, swapped whole
        self.timings: deque[tuple[str, float, int, str]] = deque(maxlen=100_000)  # (model, s, rows, sampler)
        self.rates: deque[tuple[float, int, float]] = deque(maxlen=4096)  # (at, rows, seconds) per step
        self.failed_steps = 0  # consecutive, across engines

    # --- other threads ------------------------------------------------------------------------------
    def submit(self, command: Command) -> None:
        """Queue a command for the loop's thread (thread-safe); it applies before the next step."""
        self._commands.put(command)
        self._wake.set()

    def wake(self) -> None:
        """End an idle wait early (e.g. to notice a stop request)."""
        self._wake.set()

    # --- the loop's thread --------------------------------------------------------------------------
    def run(self, stopping: threading.Event) -> None:
        """Step until `stopping` is set; an unexpected error is logged and the loop goes on."""
        while not stopping.is_set():
            try:
                if not self.run_once():
                    self._wake.wait(0.1)
            except Exception:  # never let the thread die: the replica's health check watches it
                self.log.exception("engine loop error")
                time.sleep(0.1)

    def run_once(self) -> bool:
        """Apply queued commands, then step every engine with work once; False when none had
        work (the caller may wait for a command)."""
        self._wake.clear()  # before draining: a command that arrives after the drain wakes the wait
        self.apply_commands()
        busy = [(name, e) for name, e in self.engines.items() if not e.idle]
        if not busy:
            self._publish()
            return False
        for name, engine in busy:
            self._step(name, engine)
        now = self._clock()
        if now - self._last_publish >= self.publish_every:
            self._publish()
            self._last_publish = now
        return True

    def apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            match command:
                case Add(model, request):
                    try:
                        self.engines[model].add(request)
                    except (ValueError, KeyError) as e:  # this request only; its batch-mates are unaffected
                        self.listener.failed(request.id, ValueError(f"cannot run shard: {e}"))
                case Cancel(model, request_id):
                    if model in self.engines:
                        self.engines[model].cancel(request_id)
                case SetMaxBatch(setting, done):
                    try:
                        self._set_max_batch(setting)
                    except Exception as e:
                        self.log.exception("reconfigure to max_batch_images=%d failed", setting)
                        done.set_exception(e)
                    else:
                        done.set_result(None)
                case _:
                    raise TypeError(f"not an engine command: {command!r}")

    def _step(self, name: str, engine: DenoisingEngine) -> None:
        try:
            finished = engine.step()
            previews = engine.take_previews()
        except Exception as e:  # fail this engine's requests (the workers retry them), keep serving
            self.failed_steps += 1
            self.log.exception("engine %s failed a step; failing its %d shards", name, len(engine))
            out_of_memory = isinstance(e, torch.cuda.OutOfMemoryError)
            if out_of_memory:  # retry the shards with smaller steps
                engine.set_max_batch(max(self.min_batch, engine.config.max_batch // 2))
                self.log.warning(
                    "engine %s: max_batch lowered to %d after running out of memory", name, engine.config.max_batch
                )
            for rid in list(engine.progress()):
                engine.cancel(rid)
                self.listener.failed(rid, e)
            engine.step()  # drops the canceled rows and, idle now, their device buffers
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()  # after the buffers are dropped, so their memory goes back
            return
        self.failed_steps = 0
        for done in finished:
            self.listener.finished(done.id, done)
        if previews:
            self.listener.previews(previews)
        now = self._clock()
        for seconds, rows, sampler in engine.step_times():
            self.timings.append((name, seconds, rows, sampler))
            self.rates.append((now, rows, seconds))

    def _set_max_batch(self, setting: int) -> None:
        """Each engine's max_batch: the setting, capped by free GPU memory (probed at the engine's
        precision), then every bucket warmed up; an engine whose warm-up fails keeps its old size."""
        for name, engine in self.engines.items():
            max_batch = max_batch_for_memory(engine.model, setting, engine.dtype)
            if max_batch < self.min_batch:
                self.log.warning(
                    "engine %s: free memory fits %d rows, below the least batch; using %d",
                    name, max_batch, self.min_batch,
                )  # fmt: skip
                max_batch = self.min_batch
            previous = engine.config.max_batch
            engine.set_max_batch(max_batch)
            started = time.perf_counter()
            try:
                engine.warm_up(self.warmup_seconds, log=lambda m, n=name: self.log.info("warm-up %s: %s", n, m))
            except Exception:
                engine.set_max_batch(previous)
                raise
            self.log.info(
                "engine %s: max_batch %d (setting %d), %s, warm-up %.1f s",
                name, engine.config.max_batch, setting, engine.dtype, time.perf_counter() - started,
            )  # fmt: skip

    def _publish(self) -> None:
        progress: dict[Hashable, int] = {}
        for engine in self.engines.values():
            progress.update(engine.progress())
        self.progress = progress  # one reference swap: readers see whole snapshots
