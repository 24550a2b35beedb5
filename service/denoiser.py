"""The Denoiser deployment: loads every model once per replica (one GPU each where GPUs exist)
and runs the reverse process for batches of shards assembled by @serve.batch.

Shards whose (model, sampler, sampler options, steps, guidance) agree run as one tensor batch;
each image keeps its own (seed, index) noise stream, so batching never changes an image. Every
denoising step is timed into undiffuse_denoise_step_seconds, reports progress to the job record
and checks for cancellation; a batch whose jobs are all canceled stops at its next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import defaultdict
from typing import Any

from ray import serve
from redis.exceptions import RedisError

from service import metrics
from service.jobs.schemas import JobStatus, ShardResult, ShardTask
from service.jobs.store import JobStore
from service.models import ModelRegistry
from service.settings import Settings

log = logging.getLogger("ray.serve")
DEFAULT_BATCH = {"max_batch_images": 64, "batch_wait_timeout_s": 0.02}


class _AllCanceled(Exception):
    pass


def _batch_images(tasks: list[ShardTask]) -> int:
    return sum(t.count for t in tasks)


@serve.deployment(name="Denoiser", max_ongoing_requests=64, user_config=DEFAULT_BATCH)
class Denoiser:
    def __init__(self, settings: Settings) -> None:
        # heavy imports live here, in the replica, never at import time of the HTTP layer
        import torch

        from undiffuse import load_model

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        use_cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.registry = ModelRegistry(settings.model_dir, settings.default_model)
        self.models = {name: load_model(spec.path, self.device) for name, spec in self.registry.models.items()}
        self.store = JobStore.from_url(
            settings.redis_url, settings.job_ttl_seconds, settings.shard_size, settings.redis_timeout_seconds
        )
        self.progress_timeout_s = settings.redis_timeout_seconds * 2
        self.loop: asyncio.AbstractEventLoop | None = None
        log.info("Denoiser ready on %s with models %s", self.device, sorted(self.models))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Tune batching without a redeploy: max_batch_images, batch_wait_timeout_s."""
        cfg = {**DEFAULT_BATCH, **(user_config or {})}
        self.generate_batch.set_max_batch_size(int(cfg["max_batch_images"]))
        self.generate_batch.set_batch_wait_timeout_s(float(cfg["batch_wait_timeout_s"]))

    def check_health(self) -> None:
        if not self.models:
            raise RuntimeError("no model loaded")

    async def ready(self) -> list[str]:
        return sorted(self.models)

    async def generate(self, task: ShardTask) -> ShardResult:
        """Denoise one shard (batched with whatever else is in flight)."""
        result = await self.generate_batch(task)
        if isinstance(result, Exception):
            raise result  # this shard's group failed; other groups of the batch are unaffected
        return result

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.02, batch_size_fn=_batch_images)
    async def generate_batch(self, tasks: list[ShardTask]) -> list[ShardResult | Exception]:
        """One tensor batch per compatible group. A group that fails hands its exception to its
        own shards only: a bad shard must not fail the other jobs it was batched with."""
        self.loop = asyncio.get_running_loop()
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            groups[task.batch_key].append(i)
        results: list[ShardResult | Exception | None] = [None] * len(tasks)
        for members in groups.values():
            group = [tasks[i] for i in members]
            try:
                outcome: list[ShardResult | Exception] = await asyncio.to_thread(self._run_group, group)
            except Exception as e:
                log.exception("batch of %d shards (%s) failed", len(group), group[0].batch_key)
                outcome = [e] * len(group)
            for i, result in zip(members, outcome, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    # --- runs in a worker thread so the replica's event loop stays responsive ---------------------
    def _run_group(self, tasks: list[ShardTask]) -> list[ShardResult]:
        import torch

        from undiffuse import ImageNoise
        from undiffuse.images import to_uint8
        from undiffuse.registry import make_sampler

        p = tasks[0].params
        model = self.models[p.model]
        seeds = [t.params.seed for t in tasks for _ in range(t.count)]
        indices = [t.start + k for t in tasks for k in range(t.count)]
        labels = None
        if model.num_classes is not None:  # the ingress made labels mandatory for these models
            labels = torch.tensor([c for t in tasks for c in t.params.labels_for(t.start, t.count) or []])
        sampler = make_sampler(p.sampler, model.schedule, **p.sampler_options)
        metrics.sampler_batch_images().observe(len(seeds), tags={"model": p.model})
        step_hist = metrics.denoise_step_seconds()
        tags = {"model": p.model, "sampler": p.sampler}
        canceled: set[str] = set()
        job_ids = {t.job_id for t in tasks}
        last = time.perf_counter()

        def on_step(i: int, t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
            nonlocal last
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_hist.observe(now - last, tags=tags)
            last = now
            canceled.update(self._report_step(tasks, i + 1))
            if canceled >= job_ids:
                raise _AllCanceled

        try:
            x = sampler.sample(
                model.eps,
                model.image_shape,
                steps=p.steps,
                noise=ImageNoise(seeds, indices, self.device),
                class_labels=labels,
                guidance_scale=p.guidance_scale,
                callback=on_step,
                device=self.device,
            )
        except _AllCanceled:
            return [ShardResult(job_id=t.job_id, shard=t.shard, canceled=True) for t in tasks]
        pixels = to_uint8(x)  # [N, H, W, C] uint8
        out, offset = [], 0
        for t in tasks:
            chunk = pixels[offset : offset + t.count]
            offset += t.count
            out.append(
                ShardResult(
                    job_id=t.job_id,
                    shard=t.shard,
                    canceled=t.job_id in canceled,
                    pixels=chunk.tobytes(),
                    shape=tuple(chunk.shape),
                )
            )
        return out

    def _report_step(self, tasks: list[ShardTask], step: int) -> set[str]:
        """Write each shard's step (on the replica's event loop) and return the jobs that were
        canceled meanwhile. A Redis outage only costs progress updates, never the images."""
        assert self.loop is not None, "set by generate_batch before any group runs"
        shards = [(t.job_id, t.shard) for t in tasks]
        future = asyncio.run_coroutine_threadsafe(self.store.record_steps(shards, step), self.loop)
        try:
            statuses = future.result(self.progress_timeout_s)
        except (RedisError, concurrent.futures.TimeoutError) as e:
            future.cancel()
            log.warning("progress not recorded: %s", e)
            return set()
        return {job_id for (job_id, _), s in zip(shards, statuses, strict=True) if s == JobStatus.canceled}
