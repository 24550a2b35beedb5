"""The Worker deployment: each replica runs a Consumer loop, a Sweeper and a webhook Dispatcher in its
event loop."""

from __future__ import annotations

import asyncio
import logging

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from service.jobs.records import ShardResult, ShardTask
from service.jobs.store import JobStore
from service.settings import Settings
from service.storage import ObjectStore
from worker.consumer import Consumer, ReplicaLost
from worker.dispatcher import Dispatcher
from worker.sweeper import Sweeper

log = logging.getLogger("ray.serve")


@serve.deployment(name="Worker", ray_actor_options={"num_cpus": 0.5}, graceful_shutdown_timeout_s=30)
class Worker:
    async def __init__(self, settings: Settings, denoiser: DeploymentHandle) -> None:
        self.denoiser = denoiser
        store = JobStore.from_settings(settings)
        objects = ObjectStore(settings.storage)
        name = serve.get_replica_context().replica_id.unique_id
        self.consumer = Consumer(settings.queue, store, objects, self._generate, name=f"worker-{name}")
        self.sweeper = Sweeper(store, objects)
        self.dispatcher = Dispatcher(settings.webhooks, store, objects)
        loop = asyncio.get_running_loop()
        self.loop_task = loop.create_task(self.consumer.run())
        self.sweep_task = loop.create_task(self.sweeper.run())
        self.dispatch_task = loop.create_task(self.dispatcher.run())

    async def _generate(self, task: ShardTask) -> ShardResult:
        try:
            return await self.denoiser.generate.remote(task)
        except RayActorError as e:  # the replica died (ActorDiedError, ActorUnavailableError): not the shard
            raise ReplicaLost(type(e).__name__) from e

    def check_health(self) -> None:
        if self.loop_task.done():
            raise RuntimeError(f"consumer loop stopped: {self.loop_task.exception()!r}")

    async def __del__(self) -> None:
        self.sweeper.stopping.set()
        self.dispatcher.stopping.set()
        await self.consumer.drain(timeout=25)
        await self.dispatcher.drain(timeout=2)  # an unfinished attempt is sent again when its lease ends
        self.loop_task.cancel()
        self.sweep_task.cancel()
        self.dispatch_task.cancel()
