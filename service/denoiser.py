"""The Denoiser deployment: a thin Serve shell around `undiffuse.engine.DenoisingEngine`.

Each replica loads every model once (one GPU per replica where GPUs exist) and runs one engine
per model on a dedicated thread (`undiffuse.engine_loop.EngineLoop`, which takes typed commands
and knows nothing of Ray), which does nothing but step: shards from any job join the running
batch at the next denoising step, and leave it as soon as their rows are done. The replica's
event loop does everything else, off the stepping path:

- `generate(shard)` hands the shard to the engine thread and awaits its pixels; the engine
  finishes a shard with uint8 pixels copied to pinned host memory without waiting, and the loop
  waits for that copy in a worker thread, so PNG encoding and upload (the Worker's job) overlap
  with the next steps;
- every `progress_interval_seconds` (0.25 s) it writes each running shard's step to its job
  record in one Redis round trip and reads back the jobs' statuses: a canceled (or failed, or
  expired) job's rows are removed from the batch at the engine's next step;
- it records every denoising step in undiffuse_denoise_step_seconds and its batch size in
  undiffuse_sampler_batch_images, from timings the engine takes without a device-wide sync, and
  the host time between consecutive steps in undiffuse_engine_step_gap_seconds;
- for a job that asked for previews, its first shard's engine request makes previews of the
  job's first image (undiffuse.engine.Preview); one writer task encodes each as a PNG (off the
  loop) and appends it to the job's events, in order, dropping previews if Redis falls behind.

A Redis outage costs progress updates only; it never stalls a step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ray import serve
from redis.exceptions import RedisError

from service import metrics
from service.jobs.records import JobStatus, ShardResult, ShardTask
from service.jobs.store import JobStore
from service.logs import ms, shard_fields
from service.models import ModelRegistry
from service.settings import Settings
from undiffuse.images import png_bytes

log = logging.getLogger("ray.serve")
DEFAULT_CONFIG = {"max_batch_images": None}  # None: a guided shard's rows on a CPU, what memory fits on a GPU
GPU_MAX_BATCH = 4096  # the ceiling of a GPU's default, before free memory caps it
REPORT_INTERVAL_SECONDS = 1.0  # how often a replica reports its capacity (service.jobs.capacity)
RATE_WINDOW_SECONDS = 30.0  # throughput: row-steps per second over the steps of the last 30 s
# a shard of a job that ended stops (a duplicate attempt of a finished job too), and so does one
# whose record is gone (deleted through the API, or expired)
STOP_STATUSES = {JobStatus.canceled, JobStatus.failed, JobStatus.succeeded, None}
MAX_FAILED_STEPS = 3  # consecutive failed steps before check_health fails the replica
MAX_QUEUED_PREVIEWS = 64  # previews waiting for Redis beyond this are dropped


def pick_device(requested: str, torch):
    """The torch.device for UNDIFFUSE_DEVICE: `auto` is CUDA when available, else the CPU; `cuda`
    without a usable GPU raises, so a replica given the CPU image or no GPU fails to start (and
    Serve reports why) instead of sampling on the CPU unnoticed."""
    if requested == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch ({torch.__version__}) is a CPU build: the pod runs the CPU image"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU: check the "
            "driver (>= 580 for CUDA 13), the nvidia.com/gpu request and NVIDIA_VISIBLE_DEVICES"
        )
        raise RuntimeError(f"UNDIFFUSE_DEVICE=cuda, but {why}")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a Serve replica (tests that build the class directly)
        return uuid.uuid4().hex[:12]


@dataclass
class _Pending:
    task: ShardTask
    future: asyncio.Future
    model: str


@serve.deployment(name="Denoiser", max_ongoing_requests=1024, user_config=DEFAULT_CONFIG)
class Denoiser:
    def __init__(self, settings: Settings) -> None:
        # heavy imports live here, in the replica, never at import time of the HTTP layer
        import torch

        from undiffuse import load_model
        from undiffuse.engine import DenoisingEngine, EngineConfig
        from undiffuse.engine_loop import EngineLoop

        # the engines' own messages (step graphs made, decoder chunks halved) go to the replica's log
        engine_log = logging.getLogger("undiffuse")
        engine_log.setLevel(logging.INFO)
        engine_log.propagate = False
        for handler in log.handlers:
            if handler not in engine_log.handlers:
                engine_log.addHandler(handler)

        engine = settings.engine
        if engine.torch_threads:
            torch.set_num_threads(engine.torch_threads)
        self.device = pick_device(engine.device, torch)
        self.settings = settings
        self.registry = ModelRegistry(engine.model_dir, engine.default_model)
        switch = {"auto": None, "on": True, "off": False}
        compile_ = switch[engine.compile]
        self.engines: dict[str, DenoisingEngine] = {}
        for name, spec in self.registry.models.items():
            precision = engine.model_precision.get(name) or (None if engine.precision == "auto" else engine.precision)
            config = EngineConfig(
                max_batch=self._default_max_batch(),
                precision=precision,
                compile=compile_,
                compile_mode=engine.compile_mode,
                step_graphs=switch[engine.step_graphs],
                latency_slack=engine.latency_slack,
                max_decode_batch=engine.max_decode_batch,
                preview_decode_every=engine.preview_decode_every,
                invariant_rows=engine.invariant_rows,
            )
            self.engines[name] = DenoisingEngine(load_model(spec.path, self.device), config)
        self.store = JobStore.from_settings(settings)
        self._engine_loop = EngineLoop(
            self.engines,
            self,
            min_batch=engine.min_batch_rows,
            warmup_seconds=engine.warmup_seconds,
            publish_every=engine.progress_interval_seconds / 2,
            log=log,
        )
        self._stopping = threading.Event()
        self._pending: dict[str, _Pending] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exchange_task: asyncio.Task | None = None
        self._handovers: set[asyncio.Task] = set()
        self._previews: asyncio.Queue | None = None  # (task, Preview) for the preview writer
        self._preview_task: asyncio.Task | None = None
        self._throughput = 0.0  # row-steps per second, as last reported
        self._replica = _replica_name()
        self._thread = threading.Thread(
            target=self._engine_loop.run, args=(self._stopping,), name="denoiser-engine", daemon=True
        )
        self._thread.start()
        self._reporter = threading.Thread(target=self._report_capacity, name="denoiser-capacity", daemon=True)
        self._reporter.start()
        log.info("Denoiser on %s with models %s", self.device, sorted(self.engines))

    # --- Serve hooks -------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """max_batch_images: rows per network call, capped by free GPU memory; None (the
        default): see _default_max_batch. Applied on the engine thread, which then warms up
        every batch bucket within warmup_seconds."""
        cfg = {**DEFAULT_CONFIG, **(user_config or {})}
        from undiffuse.engine_loop import SetMaxBatch

        setting = cfg["max_batch_images"]
        if setting is None:
            setting = self._default_max_batch()
        command = SetMaxBatch(int(setting))
        self._engine_loop.submit(command)
        try:
            command.done.result()
        except Exception as e:  # Serve keeps the replica out of service rather than running it misconfigured
            raise RuntimeError(f"reconfigure failed: {e!r}") from e

    def _default_max_batch(self) -> int:
        """On a GPU, GPU_MAX_BATCH, which free memory then caps: a step costs about the same
        from one row to thousands. On a CPU a step's cost grows with its rows (5-6 ms per row
        of the demo model from 8 rows up, docs/benchmarks.md), so a bigger batch buys no
        throughput and only makes a newly arrived shard wait longer for the step in progress:
        the smallest batch that holds a guided shard (Settings.min_batch_rows)."""
        return GPU_MAX_BATCH if self.device.type == "cuda" else self.settings.min_batch_rows

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread stopped")
        if not self._reporter.is_alive():
            raise RuntimeError("the capacity reporter stopped")
        failed = self._engine_loop.failed_steps
        if failed >= MAX_FAILED_STEPS:  # e.g. a broken CUDA context: let Serve replace us
            raise RuntimeError(f"{failed} denoising steps failed in a row")

    async def ready(self) -> list[str]:
        return sorted(self.engines)

    async def generate(self, task: ShardTask) -> ShardResult:
        """Denoise one shard; it joins the running batch at the next step."""
        from undiffuse.engine import Request
        from undiffuse.engine_loop import Add, Cancel

        self._start_exchange()
        p = task.params
        rid = f"{task.job_id}/{task.shard}/{uuid.uuid4().hex[:8]}"
        request = Request(
            id=rid,
            owner=task.job_id if task.owner is None else task.owner,
            seed=p.seed,
            start=task.start,
            count=task.count,
            steps=p.steps,
            sampler=p.sampler,
            options=p.sampler_options,
            labels=p.labels_for(task.start, task.count),
            guidance_scale=p.guidance_scale,
            preview_every=p.preview_every if task.start == 0 else None,  # the job's first image only
        )
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(task, future, p.model)
        self._engine_loop.submit(Add(p.model, request))
        started = time.monotonic()
        try:
            result = await future
        except asyncio.CancelledError:  # the caller gave up (a timeout): free the rows
            self._engine_loop.submit(Cancel(p.model, rid))
            raise
        finally:
            self._pending.pop(rid, None)
        took = time.monotonic() - started
        log.info(
            "shard %s/%d %s: %d images, %d steps, %.0f ms", task.job_id, task.shard,
            "canceled" if result.canceled else "sampled", task.count, p.steps, ms(took),
            extra=shard_fields(task, images=task.count, steps=p.steps, model=p.model, duration_ms=ms(took)),
        )  # fmt: skip
        return result

    def __del__(self) -> None:
        self._stopping.set()
        self._engine_loop.wake()
        self._reporter.join(timeout=2.0)  # it withdraws this replica's report

    # --- the capacity reports ----------------------------------------------------------------------
    def _report_capacity(self) -> None:
        """Every second: this replica's batch and throughput to Redis (service.jobs.capacity),
        from which the Workers size admission, the Ingress estimates start times and the
        autoscaling policy sizes the deployment. On its own thread: a Redis outage delays
        reports only."""
        from service.jobs import capacity
        from service.jobs.connection import sync_redis

        client = sync_redis(self.settings.redis_url, self.settings.redis_timeout_seconds)
        while not self._stopping.wait(REPORT_INTERVAL_SECONDS):
            self._throughput = self._measured_throughput()
            max_batch = max((e.config.max_batch for e in self.engines.values()), default=0)
            metrics.denoiser_throughput().set(self._throughput, tags={"replica": self._replica})
            try:
                capacity.report(client, self._replica, max_batch, self._throughput)
            except RedisError as e:
                log.warning("capacity not reported: %s", e)
            except Exception:  # never let the thread die: check_health would fail the replica
                log.exception("capacity report failed")
        try:
            capacity.withdraw(client, self._replica)
        except RedisError:
            pass  # the report goes stale and is ignored

    def _measured_throughput(self) -> float:
        """Row-steps per second over the steps of the last RATE_WINDOW_SECONDS; the last figure
        while idle (what the replica does when work comes)."""
        horizon = time.monotonic() - RATE_WINDOW_SECONDS
        recent = [(rows, seconds) for at, rows, seconds in list(self._engine_loop.rates) if at >= horizon]
        busy = sum(seconds for _, seconds in recent)
        return sum(rows for rows, _ in recent) / busy if busy > 0 else self._throughput

    # --- what the engine thread reports (EngineLoop's Listener), on that thread ---------------------
    def finished(self, rid: str, finished) -> None:
        self._resolve(rid, finished=finished)

    def failed(self, rid: str, error: Exception) -> None:
        self._resolve(rid, error=error)

    def previews(self, previews: list) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue_previews, previews)

    def _resolve(self, rid: str, finished=None, error: Exception | None = None) -> None:
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._deliver, rid, finished, error)

    # --- the event loop ------------------------------------------------------------------------------
    def _start_exchange(self) -> None:
        if self._exchange_task is None:
            self._loop = asyncio.get_running_loop()
            self._previews = asyncio.Queue(MAX_QUEUED_PREVIEWS)
            self._preview_task = self._loop.create_task(self._write_previews())
            self._exchange_task = self._loop.create_task(self._exchange())

    def _queue_previews(self, previews: list) -> None:
        for preview in previews:
            pending = self._pending.get(preview.id)
            if pending is None or pending.future.done():
                continue  # its shard was canceled or given up
            try:
                self._previews.put_nowait((pending.task, preview))
            except asyncio.QueueFull:
                log.warning("preview of job %s at step %d dropped: Redis is behind", pending.task.job_id, preview.step)

    async def _write_previews(self) -> None:
        """One at a time, so each job's previews are appended in step order."""
        while True:
            task, preview = await self._previews.get()
            try:
                png = await asyncio.to_thread(lambda p=preview: png_bytes(p.pixels(), compress_level=1))
                data = {
                    "step": preview.step,
                    "steps": task.params.steps,
                    "index": 0,
                    "png": base64.b64encode(png).decode(),
                }
                await self.store.add_preview(task.job_id, preview.step, json.dumps(data))
            except RedisError as e:
                log.warning("preview of job %s not recorded: %s", task.job_id, e)
            except Exception:
                log.exception("preview of job %s failed", task.job_id)

    def _deliver(self, rid: str, finished, error: Exception | None) -> None:
        pending = self._pending.get(rid)
        if pending is None or pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            task = asyncio.ensure_future(self._hand_over(pending, finished))
            self._handovers.add(task)  # keep a reference until it is done
            task.add_done_callback(self._handovers.discard)

    async def _hand_over(self, pending: _Pending, finished) -> None:
        try:
            pixels = await asyncio.to_thread(finished.pixels)  # waits for the async copy, off the loop
        except Exception as e:  # a device error surfacing at the copy: this shard fails, now
            if not pending.future.done():
                pending.future.set_exception(e)
            return
        if not pending.future.done():
            t = pending.task
            pending.future.set_result(
                ShardResult(job_id=t.job_id, shard=t.shard, pixels=pixels.tobytes(), shape=tuple(pixels.shape))
            )

    async def _exchange(self) -> None:
        """Progress out, cancellations in, and the step metrics, every progress interval."""
        while True:
            await asyncio.sleep(self.settings.progress_interval_seconds)
            try:
                self._record_timings()
                await self._exchange_progress()
            except RedisError as e:
                log.warning("progress not recorded: %s", e)
            except Exception:
                log.exception("progress exchange failed")

    def _record_timings(self) -> None:
        steps, batches = metrics.denoise_step_seconds(), metrics.sampler_batch_images()
        timings = self._engine_loop.timings
        while timings:  # popleft is safe against the engine thread's appends
            model, seconds, rows, sampler = timings.popleft()
            steps.observe(seconds, tags={"model": model, "sampler": sampler})
            batches.observe(rows, tags={"model": model})
        gaps, gap_seconds = self._engine_loop.gaps, metrics.engine_step_gap_seconds()
        while gaps:
            gap_seconds.observe(gaps.popleft())

    async def _exchange_progress(self) -> None:
        from undiffuse.engine_loop import Cancel

        snapshot = self._engine_loop.progress
        running = [(rid, p) for rid, p in list(self._pending.items()) if rid in snapshot]
        if not running:
            return
        statuses = await self.store.record_steps([(p.task.job_id, p.task.shard, snapshot[rid]) for rid, p in running])
        for (rid, p), status in zip(running, statuses, strict=True):
            if status in STOP_STATUSES and not p.future.done():
                self._engine_loop.submit(Cancel(p.model, rid))
                p.future.set_result(ShardResult(job_id=p.task.job_id, shard=p.task.shard, canceled=True))
