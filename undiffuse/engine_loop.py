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
`min_batch`) and hands the cached device memory back once the failed step's tensors are gone.
(A latent decoder that runs out of memory halves its own chunk and retries inside the step:
only one image that does not fit reaches the loop.) Nothing here waits on anything but the
step itself; progress and step timings are published for other threads to read (`progress`,
`timings`, `rates`, `gaps`).

`gaps` are the host seconds from the end of one `engine.step()` to the start of the next while
work continues: reports to the listener, commands, and whatever else holds the interpreter (in a Ray replica,
its event loop shares the GIL with this thread). On a GPU the device idles through a gap unless
the queued steps outlast it, so a gap that grows under load is time the device waits for Python
(the Denoiser exports them as undiffuse_engine_step_gap_seconds; bench/service.py measures
them with and without HTTP load).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
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
    """Every engine's rows per network call: `setting`, capped by free device memory less what
    the engines' decoders take (never below the loop's min_batch), then every bucket warmed up,
    then every latent decoder sized and warmed up. `done` resolves when applied, or raises why
    not (an engine whose warm-up failed keeps its old sizes)."""

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
        self.gaps: deque[float] = deque(maxlen=100_000)  # host seconds between consecutive steps (module docs)
        self._step_ended: float | None = None  # perf_counter at the end of the last step, while busy
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
            self._step_ended = None  # an idle wait is not a gap
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
        started = time.perf_counter()
        if self._step_ended is not None:
            self.gaps.append(started - self._step_ended)
        try:
            finished = engine.step()
            self._step_ended = time.perf_counter()
            previews = engine.take_previews()
        except Exception as e:  # fail this engine's requests (the workers retry them), keep serving
            self._step_ended = None  # the next step's gap is not measured from a failed one
            self.failed_steps += 1
            self.log.exception("engine %s failed a step; failing its %d shards", name, len(engine))
            error = e
        else:
            self._report(name, engine, finished, previews)
            return
        # past the except clause: the interpreter no longer holds the error as the one being handled
        out_of_memory = self._fail(name, engine, error)
        del error
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()  # after the failed step's tensors and the canceled rows are dropped

    def _fail(self, name: str, engine: DenoisingEngine, error: Exception) -> bool:
        """Fail every request of `engine` with `error` and drop their rows; after running out of
        memory, halve the engine's max_batch first and let go of the error's traceback (logged
        already), whose frames hold the failed step's tensors, so that the memory can go back
        to the device while the listeners still hold the error. True after running out of memory."""
        out_of_memory = isinstance(error, torch.cuda.OutOfMemoryError)
        if out_of_memory:  # retry the shards with smaller steps
            _drop_tracebacks(error)
            engine.set_max_batch(max(self.min_batch, engine.config.max_batch // 2))
            self.log.warning(
                "engine %s: max_batch lowered to %d after running out of memory", name, engine.config.max_batch
            )
        for rid in list(engine.progress()):
            engine.cancel(rid)
            self.listener.failed(rid, error)
        engine.step()  # drops the canceled rows and, idle now, their device buffers
        return out_of_memory

    def _report(self, name: str, engine: DenoisingEngine, finished: list[Finished], previews: list[Preview]) -> None:
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
        precision) less what the decoders of every engine take at their chunks
        (`DenoisingEngine.decode_reserved_bytes`: decodes run on side streams beside every
        engine's steps, and their blocks cached there are no use to the steps), then every
        bucket warmed up. Then each latent decoder is measured, sized (unless already sized or
        set) from the memory the networks left less what the other decoders take, and warmed
        up. Every network first: a decoder sized before another engine's network would count
        memory that network takes, and the network memory that decoder takes. An engine whose
        warm-up fails keeps its old max_batch and decode chunk."""
        engines = list(self.engines.items())
        previous = {name: (e.config.max_batch, e.decode_batch) for name, e in engines}
        for _, engine in engines:
            engine.measure_decoder()  # a set chunk's memory is reserved from the first sizing on
        reserved = sum(e.decode_reserved_bytes for _, e in engines)  # chunks sized by memory: 0 until sized
        for name, engine in engines:
            max_batch = max_batch_for_memory(engine.model, setting, engine.dtype, decode_reserved_bytes=reserved)
            if max_batch < self.min_batch:
                self.log.warning(
                    "engine %s: free memory fits %d rows, below the least batch; using %d",
                    name, max_batch, self.min_batch,
                )  # fmt: skip
                max_batch = self.min_batch
            engine.set_max_batch(max_batch)
            started = time.perf_counter()
            with self._restoring(name, engine, previous[name]):
                engine.warm_up(self.warmup_seconds, log=self._warm_up_log(name), decoder=False)
            self.log.info(
                "engine %s: max_batch %d (setting %d), %s, warm-up %.1f s",
                name, engine.config.max_batch, setting, engine.dtype, time.perf_counter() - started,
            )  # fmt: skip
        for name, engine in engines:
            if engine.decoder is None:
                continue
            others = sum(e.decode_reserved_bytes for _, e in engines if e is not engine)
            started = time.perf_counter()
            with self._restoring(name, engine, previous[name]):
                engine.warm_up_decoder(self.warmup_seconds, log=self._warm_up_log(name), reserved_elsewhere=others)
            self.log.info(
                "engine %s: decoder %d images per call, %.0f MiB, warm-up %.1f s",
                name, engine.decode_batch, engine.decode_reserved_bytes / 2**20, time.perf_counter() - started,
            )  # fmt: skip

    @contextmanager
    def _restoring(self, name: str, engine: DenoisingEngine, sizes: tuple[int, int | None]) -> Iterator[None]:
        """On an error in the block, give `engine` back its max_batch and decode chunk `sizes` (those
        that changed) and raise it."""
        try:
            yield
        except Exception:
            max_batch, decode_batch = sizes
            if engine.config.max_batch != max_batch:
                engine.set_max_batch(max_batch)
            if engine.decode_batch != decode_batch:
                engine.set_decode_batch(decode_batch)
            self.log.warning("engine %s: warm-up failed; back to max_batch %d", name, engine.config.max_batch)
            raise

    def _warm_up_log(self, name: str) -> Callable[[str], None]:
        return lambda message: self.log.info("warm-up %s: %s", name, message)

    def _publish(self) -> None:
        progress: dict[Hashable, int] = {}
        for engine in self.engines.values():
            progress.update(engine.progress())
        self.progress = progress  # one reference swap: readers see whole snapshots


def _drop_tracebacks(error: BaseException) -> None:
    """Let go of the tracebacks of `error` and of the errors it was raised from or during: their
    frames hold the tensors of the step that failed."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        pending += [e.__cause__, e.__context__]
