"""The denoising engine: continuous batching must not change any image, cancel must remove
rows at the next step, admission must be fair across owners, and the scheduler must keep short
requests fast where merging is expensive."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from undiffuse import DiffusionModel, ImageNoise, ModelConfig, ScheduleConfig, UNet, UNetConfig
from undiffuse.config import Thresholding
from undiffuse.engine import DenoisingEngine, EngineConfig, Request
from undiffuse.registry import make_sampler
from undiffuse.samplers import NULL_CLASS, guided_timesteps

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=3)


@pytest.fixture(scope="module")
def model() -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(TINY)
    with torch.no_grad():  # non-trivial weights: the zero-initialised output layers would hide bugs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiffusionModel.from_config(net, ModelConfig(TINY, ScheduleConfig(num_timesteps=200))).eval()


WHOLE = {"invariant_rows": 0}
"""The network on whole batches, for the tests that watch its calls (batch-invariant slices,
a CPU's default, have their own tests: test_invariance.py)."""

STEP_GRAPHS = pytest.mark.parametrize(
    "stepping", [{}, {"step_graphs": True, **WHOLE}], ids=["launch-by-launch", "step-graphs"]
)
"""Run a test both ways a step can run: op by op, and as a step graph's static-buffer step
(undiffuse.step_graph; on a CPU the same step without recording it)."""


def reference(model: DiffusionModel, r: Request, compiled: bool = False) -> torch.Tensor:
    """The one-request sampler's output for the same images (stepping through the compiled
    update with `compiled`)."""
    sampler = make_sampler(r.sampler, model.schedule, **r.options)
    if compiled:
        sampler.compile()
    return sampler.sample(
        model.eps,
        model.image_shape,
        steps=r.steps,
        noise=ImageNoise([r.seed] * r.count, list(range(r.start, r.start + r.count))),
        class_labels=torch.tensor(list(r.labels)) if r.labels is not None else None,
        guidance_scale=r.guidance_scale,
        guidance_interval=model.guidance_interval,
    )


def run(engine: DenoisingEngine, arrivals: dict[int, list[Request]] | None = None, max_steps: int = 10_000) -> dict:
    """Step until idle, adding arrivals[k] before step k; returns {request id: Finished}."""
    arrivals = arrivals or {}
    done, k = {}, 0
    while (not engine.idle or any(a >= k for a in arrivals)) and k < max_steps:
        for r in arrivals.get(k, []):
            engine.add(r)
        for f in engine.step():
            done[f.id] = f
        k += 1
    return done


REQUESTS = [
    Request("ddim", "a", seed=1, start=0, count=3, steps=12, labels=[0, 1, 2]),
    Request("dpm", "c", seed=5, start=0, count=2, steps=8, sampler="dpmpp_2m", labels=[0, 2]),  # per-row history
    Request("dpm-logsnr", "b", seed=7, start=2, count=2, steps=9, sampler="dpmpp_2m_logsnr", labels=[1, 0]),
    Request("ddim-eta", "b", seed=2, start=5, count=2, steps=7, options={"eta": 0.5}, labels=[1, 1]),
    Request("ddpm", "a", seed=3, start=0, count=2, steps=9, sampler="ddpm", labels=[2, 0]),
    Request("guided", "c", seed=4, start=3, count=2, steps=10, labels=[1, 2], guidance_scale=2.5),
    Request("late", "b", seed=1, start=3, count=1, steps=12, labels=[0]),
    Request(
        "dpm-guided", "a", seed=6, start=1, count=2, steps=6, sampler="dpmpp_2m", labels=[2, 1], guidance_scale=2.0
    ),
]


class RowWise(torch.nn.Module):
    """A network whose output for a row depends on that row alone, bit for bit, whatever the
    batch: isolates the engine's own arithmetic from the convolutions' batch-size-dependent
    kernels."""

    def forward(self, x, t, labels=None):
        shift = (t.float() / 200 + labels.float()).view(-1, 1, 1, 1)
        return torch.tanh(x * 0.9 + shift)


@STEP_GRAPHS
def test_the_engine_arithmetic_is_exact(model, stepping):
    """With a row-wise network, every image equals Sampler.sample for its (seed, index) bit for
    bit: rows at different steps, samplers, step counts and guidance in one batch, arriving at
    different times."""
    rowwise = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **stepping))
    done = run(engine, {0: REQUESTS[:2], 2: REQUESTS[2:4], 5: REQUESTS[4:]})
    assert set(done) == {r.id for r in REQUESTS}
    for r in REQUESTS:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id


@pytest.mark.slow
@pytest.mark.compiles
@STEP_GRAPHS
def test_an_engine_that_compiles_steps_through_the_compiled_update_bit_for_bit(stepping):
    """An engine that compiles fuses every row's sampler step into one compiled kernel, the one
    `Sampler.compile` gives a sampler: its images equal a compiled Sampler.sample bit for bit
    across samplers, noise, histories, clipped and unclipped rows and guidance, at the batch
    sizes that arrivals make (and they are not the eager arithmetic's, which would prove nothing)."""
    rowwise = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    config = EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, compile=True, **stepping)
    engine = DenoisingEngine(rowwise, config)
    engine.network = rowwise.network  # the update compiled, not the network (compiling it takes minutes here)
    picked = REQUESTS[:6]  # ddim, dpmpp_2m, dpmpp_2m_logsnr, ddim eta 0.5, ddpm, guided ddim
    done = run(engine, {0: picked[:2], 2: picked[2:4], 5: picked[4:]})
    assert set(done) == {r.id for r in picked}
    for r in picked:
        assert torch.equal(done[r.id].samples, reference(rowwise, r, compiled=True)), r.id
    assert any(not torch.equal(done[r.id].samples, reference(rowwise, r)) for r in picked)


def test_guidance_acts_only_inside_the_models_interval_exactly_as_in_the_sampler(model):
    """A model with a guidance interval: the engine's twins guide only the timesteps inside it,
    bit for bit as Sampler.sample does (and the result is neither unguided nor guided throughout)."""
    config = ModelConfig(TINY, ScheduleConfig(num_timesteps=200), guidance_interval=(0.3, 1.5))
    rowwise = DiffusionModel.from_config(RowWise(), config)
    assert rowwise.guidance_interval == (0.3, 1.5)
    guided = [r for r in REQUESTS if r.guidance_scale != 1.0]
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None))
    done = run(engine, {0: REQUESTS})
    everywhere = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    for r in REQUESTS:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    for r in guided:
        unguided = reference(rowwise, replace(r, guidance_scale=1.0))
        assert not torch.allclose(done[r.id].samples, unguided, atol=1e-4), r.id
        assert not torch.allclose(done[r.id].samples, reference(everywhere, r), atol=1e-4), r.id


def counting_model(calls: list[tuple[int, int]]) -> DiffusionModel:
    """The row-wise network with a guidance interval, appending (rows, null-class rows) of
    every call to `calls`."""

    class Counting(RowWise):
        def forward(self, x, t, labels=None):
            calls.append((x.shape[0], int((labels == NULL_CLASS).sum())))
            return super().forward(x, t, labels)

    config = ModelConfig(TINY, ScheduleConfig(num_timesteps=200), guidance_interval=(0.3, 1.5))
    return DiffusionModel.from_config(Counting(), config)


def test_null_class_twins_run_only_at_the_timesteps_inside_the_interval():
    """Outside the guidance interval a guided row is plain conditional, so its twin is not sent to
    the network at all: every call has the images plus one twin per guided image whose timestep
    is inside the interval, and the unguided request never has one."""
    calls: list[tuple[int, int]] = []  # (rows, null-class rows) of each network call
    rowwise = counting_model(calls)
    guided = Request("g", "a", seed=1, start=0, count=3, steps=12, labels=[0, 1, 2], guidance_scale=3.0)
    plain = Request("p", "b", seed=2, start=0, count=2, steps=12, labels=[1, 1])
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **WHOLE))
    done = run(engine, {0: [guided, plain]})
    inside = guided_timesteps(rowwise.schedule, rowwise.guidance_interval)
    expected = [
        (5 + 3 * int(inside[t]), 3 * int(inside[t])) for t in make_sampler("ddim", rowwise.schedule).timesteps(12)
    ]
    assert calls == expected
    assert {twins for _, twins in calls} == {0, 3}  # the interval starts and ends within the 12 steps
    assert torch.equal(done["g"].samples, reference(rowwise, guided))


def test_a_guided_request_is_priced_at_the_rows_it_sends_this_step():
    """The scheduler counts a guided request's twins only at the steps where they run: two guided
    requests of 3 images share the 8-row budget at the steps outside the interval (3 + 3 rows)
    and take turns inside it (6 rows each), and every image is still the sampler's."""
    calls: list[tuple[int, int]] = []  # (rows, null-class rows) of each network call
    rowwise = counting_model(calls)
    a = Request("a", "a", seed=1, start=0, count=3, steps=12, labels=[0, 1, 2], guidance_scale=3.0)
    b = Request("b", "b", seed=2, start=0, count=3, steps=12, labels=[2, 2, 1], guidance_scale=2.0)
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=8, keep_samples=True, latency_slack=None, **WHOLE))
    done = run(engine, {0: [a, b]})
    inside = [bool(guided_timesteps(rowwise.schedule, rowwise.guidance_interval)[t]) for t in range(200)]
    ts = make_sampler("ddim", rowwise.schedule).timesteps(12)
    before = ts.index(next(t for t in ts if inside[t]))  # steps above the interval
    within = sum(inside[t] for t in ts)
    after = 12 - before - within
    assert before > 0 and within > 0 and after > 0
    # together above the interval; inside it one at a time with its twins (6 + 6 > 8), and the
    # first stays alone below it (3 + 6 > 8) until it finishes
    assert calls == [(6, 0)] * before + ([(6, 3)] * within + [(3, 0)] * after) * 2
    for r in (a, b):
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id


def test_max_batch_follows_the_rows_a_guided_request_still_needs():
    """With a guidance interval, a guided request needs its twins' rows only until its last step
    inside the interval: max_batch may not drop below twice its images before that, and may drop
    to its images after; one whose steps never enter the interval needs no twin rows at all."""
    model = counting_model([])
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None))
    guided = Request("g", "a", seed=1, start=0, count=3, steps=12, labels=[0, 1, 2], guidance_scale=3.0)
    engine.add(guided)
    engine.set_max_batch(1)
    assert engine.config.max_batch == 6
    inside = guided_timesteps(model.schedule, model.guidance_interval)
    ts = make_sampler("ddim", model.schedule).timesteps(12)
    last_inside = max(i for i, t in enumerate(ts) if inside[t])
    for _ in range(last_inside + 1):
        engine.step()
    engine.set_max_batch(1)
    assert engine.config.max_batch == 3
    assert set(run(engine)) == {"g"}
    # one step at t = 199 (sigma above the interval): guided, yet never a twin
    engine.add(replace(guided, id="never", steps=1))
    with pytest.raises(ValueError, match="needs 6 rows"):
        engine.add(replace(guided, id="twins", steps=2))
    assert set(run(engine)) == {"never"}


# The UNet's convolutions return a row's output differently by up to ~1e-6 depending on the batch
# it is in (oneDNN picks other kernels: 1.07e-6 between batches of 9 and 1, measured on the 2-core
# CI machine), and a few steps compound that; the engine itself adds nothing (test above).
UNET_TOLERANCE = 5e-6


@pytest.mark.slow
def test_each_image_equals_the_one_request_sampler_whatever_its_neighbours(model):
    """The same with the real UNet, within float32 round-off of the network's batch dependence."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None))
    done = run(engine, {0: REQUESTS[:2], 2: REQUESTS[2:4], 5: REQUESTS[4:]})
    assert set(done) == {r.id for r in REQUESTS}
    for r in REQUESTS:
        got, want = done[r.id].samples, reference(model, r)
        assert (got - want).abs().max().item() <= UNET_TOLERANCE, r.id
        pixels = done[r.id].pixels()
        assert pixels.shape == (r.count, 8, 8, 1) and pixels.dtype.name == "uint8"
        assert (pixels == ((want.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()).all()


@pytest.mark.slow
def test_a_small_batch_budget_pauses_and_resumes_rows_without_changing_them(model):
    """max_batch below the offered rows: requests take turns (paused rows keep their state)."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=5, keep_samples=True, latency_slack=None))
    done = run(engine, {0: REQUESTS[:4]})
    for r in REQUESTS[:4]:
        assert (done[r.id].samples - reference(model, r)).abs().max().item() <= UNET_TOLERANCE, r.id


@STEP_GRAPHS
def test_guided_rows_paused_across_the_interval_edges_keep_their_twins_right(stepping):
    """A budget that makes requests take turns while their twins switch on and off at the
    interval's edges: every image is still the sampler's, bit for bit (row-wise network)."""
    config = ModelConfig(TINY, ScheduleConfig(num_timesteps=200), guidance_interval=(0.3, 1.5))
    rowwise = DiffusionModel.from_config(RowWise(), config)
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=6, keep_samples=True, latency_slack=None, **stepping))
    done = run(engine, {0: REQUESTS[:4], 3: REQUESTS[4:]})
    assert set(done) == {r.id for r in REQUESTS}
    for r in REQUESTS:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id


@STEP_GRAPHS
def test_cancel_removes_rows_at_the_next_step_and_spares_the_others(model, stepping):
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **stepping))
    keep, drop = REQUESTS[0], REQUESTS[3]
    engine.add(keep)
    engine.add(drop)
    for _ in range(3):
        assert engine.step() == []
    assert engine.progress() == {keep.id: 3, drop.id: 3}
    assert engine.cancel(drop.id) and not engine.cancel("unknown")
    engine.step()
    assert engine.progress() == {keep.id: 4}  # gone at the next step
    done = run(engine)
    assert set(done) == {keep.id}
    assert (done[keep.id].samples - reference(model, keep)).abs().max().item() <= UNET_TOLERANCE


def test_admission_is_fair_across_owners(model):
    """With one owner's 1,024-image job running, another owner's 1-image job finishes before the
    big job is 25 % done."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=64))
    engine.warm_up()  # the CPU cost table: the latency check is active too
    steps = 6
    for k in range(64):  # the big job: 64 shards of 16
        engine.add(Request(("big", k), "alice", seed=1, start=16 * k, count=16, steps=steps, labels=[1] * 16))
    images_done, small_done_at = 0, None
    for _ in range(3):
        images_done += sum(f.request.count for f in engine.step())
    engine.add(Request("small", "bob", seed=2, start=0, count=1, steps=steps, labels=[2]))
    while small_done_at is None:
        for f in engine.step():
            if f.id == "small":
                small_done_at = images_done
            else:
                images_done += f.request.count
    assert small_done_at < 0.25 * 1024


def test_short_requests_are_not_slowed_where_merging_is_expensive(model):
    """With a step-time table that grows with rows (a CPU), a 2-step request runs without the
    long request's rows; with a flat table (a GPU below saturation) they share the step."""
    for table, merged in (
        ({b: 1e-3 * b for b in (1, 2, 4, 8, 16, 32, 64)}, False),
        ({b: 1e-3 for b in (1, 2, 4, 8, 16, 32, 64)}, True),
    ):
        engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=1.25))
        engine.step_time = table
        engine.add(Request("long", "a", seed=1, start=0, count=16, steps=50, labels=[0] * 16))
        engine.step()
        engine.add(Request("short", "b", seed=2, start=0, count=1, steps=2, labels=[1]))
        engine.step()
        assert engine.progress() == ({"long": 2, "short": 1} if merged else {"long": 1, "short": 1})
        assert [f.id for f in engine.step()] == ["short"]
        assert engine.progress()["long"] == (3 if merged else 1)
        engine.step()
        assert engine.progress()["long"] == (4 if merged else 2)  # resumes once the short one is done


def _select_by_definition(engine: DenoisingEngine) -> list:
    """The selection rule as the scheduler's docstring states it, checked from scratch for every
    candidate in its offer order (quadratic in the requests; the scheduler keeps the check
    incremental)."""
    cfg, scheduler = engine.config, engine.scheduler
    head, offered = scheduler.offer_order()
    chosen = [head]
    for slot in offered:
        trial = [*chosen, slot]
        rows = sum(s.rows for s in trial)
        if rows > cfg.max_batch:
            continue
        shortest = min(s.remaining for s in trial)
        short = sum(s.rows for s in trial if s.remaining <= cfg.merge_ratio * shortest)
        if scheduler.cost(rows) <= cfg.latency_slack * scheduler.cost(short):
            chosen.append(slot)
    return sorted(s.request.id for s in chosen)


@pytest.mark.slow
@pytest.mark.parametrize("merge_ratio", [0.5, 1.0, 2.0])
def test_the_incremental_latency_check_selects_what_its_definition_does(model, merge_ratio):
    """Many requests of many owners, lengths and sizes under a table where merging costs: the
    scheduler's selection at every step equals the rule checked from scratch, and the step runs
    exactly it (also at the steps where the engine reuses its last selection instead of
    re-evaluating the rule)."""
    rng = random.Random(0)
    engine = DenoisingEngine(model, EngineConfig(max_batch=48, latency_slack=1.25, merge_ratio=merge_ratio))
    engine.step_time = {b: 1e-3 * b for b in engine.buckets}
    agreed = set()
    for k in range(60):
        count = rng.randint(1, 6)
        engine.add(
            Request(k, f"owner{k % 5}", seed=k, start=0, count=count, steps=rng.randint(2, 30),
                    labels=[k % 3] * count, guidance_scale=2.0 if k % 4 == 0 else 1.0)
        )  # fmt: skip
        if k % 2:
            continue
        for _ in range(3):
            if engine.idle:
                break
            expected = _select_by_definition(engine)
            got = sorted(s.request.id for s in engine.scheduler.select())
            assert got == expected, k
            agreed.add(len(got))
            before = engine.progress()
            engine.step()
            after = engine.progress()
            ran = sorted(rid for rid, pos in before.items() if after.get(rid, pos + 1) == pos + 1)
            assert ran == expected, k
    if merge_ratio < 1:  # no request counts as short (not even the head): nothing may join it
        assert agreed == {1}
    else:
        assert len(agreed) > 3  # selections of many sizes were compared


@pytest.mark.slow
def test_a_stream_of_short_requests_does_not_starve_a_long_one(model):
    """Where merging is expensive, short requests run first, but a waiting request ages: a
    20-step request amid one new 3-step request per step still finishes within ~2x its steps
    plus the wait its remaining work justifies."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=1.25))
    engine.step_time = {b: 1e-3 * b for b in (1, 2, 4, 8, 16, 32, 64)}
    engine.add(Request("long", "a", seed=1, start=0, count=16, steps=20, labels=[0] * 16))
    finished_at = None
    for k in range(200):
        engine.add(Request(("short", k), "b", seed=2, start=k, count=1, steps=3, labels=[1]))
        if any(f.id == "long" for f in engine.step()):
            finished_at = k
            break
    assert finished_at is not None and finished_at < 2 * 20 + 5
    # and the short ones were not held back for long: none waited more than the long's 20 steps
    assert all(s.waited <= 20 for s in engine.scheduler.slots)


def test_bad_requests_are_refused(model):
    engine = DenoisingEngine(model, EngineConfig(max_batch=4))
    with pytest.raises(ValueError, match="one class label per image"):
        engine.add(Request("x", "a", seed=0, start=0, count=2, steps=5, labels=[1]))
    with pytest.raises(ValueError, match="steps must be in"):
        engine.add(Request("x", "a", seed=0, start=0, count=1, steps=500, labels=[1]))
    with pytest.raises(ValueError, match="needs 6 rows"):
        engine.add(Request("x", "a", seed=0, start=0, count=3, steps=5, labels=[1] * 3, guidance_scale=2.0))
    with pytest.raises(ValueError, match="unknown sampler"):
        engine.add(Request("x", "a", seed=0, start=0, count=1, steps=5, labels=[1], sampler="euler"))
    engine.add(Request("x", "a", seed=0, start=0, count=1, steps=5, labels=[1]))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add(Request("x", "a", seed=0, start=0, count=1, steps=5, labels=[1]))
    with pytest.raises(ValueError, match="max_batch"):
        EngineConfig(max_batch=0)


def test_every_step_is_timed_with_its_batch_and_sampler(model):
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=None))
    engine.add(Request("a", "a", seed=1, start=0, count=2, steps=3, labels=[0, 1]))
    engine.add(Request("b", "b", seed=1, start=0, count=1, steps=2, sampler="ddpm", labels=[0]))
    run(engine)
    times = engine.step_times()
    assert [(images, sampler) for _, images, sampler in times] == [(3, "mixed"), (3, "mixed"), (2, "ddim")]
    assert all(seconds > 0 for seconds, _, _ in times) and engine.step_times() == []


def test_a_guided_steps_rows_count_its_twins(model):
    """A step's rows are the network call's: a guided row's null-class twin counts (the queue's
    cost and the replicas' throughput are in these rows)."""
    assert model.guidance_interval is None  # twins at every step
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=None))
    engine.add(Request("g", "a", seed=1, start=0, count=2, steps=2, labels=[0, 1], guidance_scale=3.0))
    engine.add(Request("u", "b", seed=1, start=0, count=1, steps=2, labels=[2]))
    run(engine)
    assert [rows for _, rows, _ in engine.step_times()] == [5, 5]


@pytest.mark.slow
def test_padding_to_batch_buckets_changes_no_image(model):
    """The compiled path pads every call to the next bucket (so steady state never recompiles);
    here padding is switched on with the eager network: rows of 3, 5, 7 ... padded to 4, 8 ...
    give the same images as unpadded calls."""
    plain = DenoisingEngine(model, EngineConfig(max_batch=16, keep_samples=True, latency_slack=None, compile=False))
    padded = DenoisingEngine(model, EngineConfig(max_batch=16, keep_samples=True, latency_slack=None, compile=False))
    padded.compiled = True  # pad as the compiled engine does, without compiling
    assert padded.buckets == (1, 2, 4, 8, 16)
    arrivals = {0: REQUESTS[:2], 2: REQUESTS[2:4], 5: REQUESTS[4:]}
    a, b = run(plain, arrivals), run(padded, arrivals)
    for r in REQUESTS:
        assert (a[r.id].samples - b[r.id].samples).abs().max().item() <= UNET_TOLERANCE, r.id


def test_the_fill_order_rotates_so_no_owner_waits_behind_another(model):
    """alice's stream of short requests is always the head; bob's and carol's requests each
    fill the rest of the batch (one at a time fits): they take turns, step by step."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=20, latency_slack=None))
    for owner in ("bob", "carol"):
        engine.add(Request(owner, owner, seed=1, start=0, count=16, steps=30, labels=[0] * 16))
    ran = {"bob": 0, "carol": 0}
    for k in range(6):
        engine.add(Request(("alice", k), "alice", seed=2, start=k, count=1, steps=1, labels=[1]))
        before = engine.progress()
        engine.step()
        after = engine.progress()
        for owner in ran:
            ran[owner] += after[owner] - before[owner]
    assert ran == {"bob": 3, "carol": 3}


def test_buckets_warm_up_did_not_reach_are_never_free(model):
    engine = DenoisingEngine(model, EngineConfig(max_batch=64))
    engine.step_time = {1: 0.001, 2: 0.002, 4: 0.004, 8: 0.008}  # warm-up stopped at 8
    assert engine.scheduler.cost(64) == pytest.approx(0.064) and engine.scheduler.cost(3) == 0.004


def test_max_batch_never_drops_below_a_queued_request(model):
    engine = DenoisingEngine(model, EngineConfig(max_batch=64))
    engine.add(Request("big", "a", seed=1, start=0, count=16, steps=3, labels=[0] * 16, guidance_scale=2.0))
    engine.set_max_batch(4)
    assert engine.config.max_batch == 32 and engine.buckets[-1] == 32
    assert set(run(engine)) == {"big"}
    with pytest.raises(ValueError, match="must lie in"):
        engine.add(Request("neg", "a", seed=-1, start=0, count=1, steps=3, labels=[0]))


@STEP_GRAPHS
def test_previews_are_the_first_images_x0_prediction_every_k_steps(model, stepping):
    """A previewing request hands back the sampler's x0 prediction of its first image after
    every k-th step (not the last), in a mixed batch with every sampler, exactly what the
    one-request sampler's callback sees; requests without previews hand back none."""
    rowwise = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, latency_slack=None, **stepping))
    every = {"ddim": 3, "dpm": 2, "ddpm": 4, "guided": 5}
    asked = [replace(r, preview_every=every[r.id]) if r.id in every else r for r in REQUESTS]
    got: dict = {}
    k = 0
    for arrival, group in ((0, asked[:2]), (2, asked[2:4]), (5, asked[4:])):
        while k < arrival:
            engine.step()
            got.update({(p.id, p.step): p.pixels() for p in engine.take_previews()})
            k += 1
        for r in group:
            engine.add(r)
    while not engine.idle:
        engine.step()
        got.update({(p.id, p.step): p.pixels() for p in engine.take_previews()})
    want = {}
    for r in asked:
        if r.preview_every is None:
            continue
        x0s = []
        sampler = make_sampler(r.sampler, rowwise.schedule, **r.options)
        sampler.sample(
            rowwise.eps,
            rowwise.image_shape,
            steps=r.steps,
            noise=ImageNoise([r.seed] * r.count, list(range(r.start, r.start + r.count))),
            class_labels=torch.tensor(list(r.labels)),
            guidance_scale=r.guidance_scale,
            callback=lambda i, t, x, x0, x0s=x0s: x0s.append(x0[:1]),
        )
        for step in range(r.preview_every, r.steps, r.preview_every):
            want[(r.id, step)] = ((x0s[step - 1].clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    assert sorted(got, key=str) == sorted(want, key=str)  # every k steps, never the last, only where asked
    for key, pixels in want.items():
        assert pixels.shape == (8, 8, 1) and (got[key] == pixels).all(), key
    with pytest.raises(ValueError, match="preview_every"):
        engine.add(replace(REQUESTS[0], preview_every=0))


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, except inside the network (`paused`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not self.paused
        return func(*args, **(kwargs or {}))


def _host_ops(requests: int) -> dict[str, int]:
    """Ops outside the network, per event, for `requests` requests of 16 rows (DDIM 50, a
    network that returns zeros, every request merged)."""
    counter = _OpCounter()

    def zeros(x, t, labels):
        counter.paused = True
        out = torch.zeros_like(x)
        counter.paused = False
        return out

    model = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    engine = DenoisingEngine(model, EngineConfig(max_batch=16 * (requests + 1), channels_last=False, **WHOLE))
    engine.network = zeros
    engine.step_time = {b: 1e-3 for b in engine.buckets}  # flat: everything merges

    def counted(fn):
        counter.ops = 0
        with counter:
            out = fn()
        return counter.ops, out

    def request(k: int) -> Request:
        return Request(k, f"o{k % 4}", seed=k, start=0, count=16, steps=50, labels=[k % 3] * 16)

    ops = {}
    ops["first"], _ = counted(lambda: [engine.add(request(k)) for k in range(requests)] and engine.step())
    ops["steady"], _ = counted(engine.step)
    ops["join"], _ = counted(lambda: engine.add(request(requests)) or engine.step())
    for _ in range(46):  # three steps done: the 50th is the first requests' last
        assert engine.step() == []
    ops["finish"], done = counted(engine.step)
    assert len(done) == requests
    return ops


def test_host_ops_per_step_do_not_grow_with_the_requests():
    """The engine's host work outside the network, counted in torch ops: a steady DDIM step
    issues a bounded number (<= 60) and the first step (every x_T in one draw), a join and the
    step where requests finish (one gather) issue as many at 32 requests as at 4."""
    few, many = _host_ops(4), _host_ops(32)
    assert few["steady"] <= 60
    assert many == few, (few, many)


def test_a_step_where_nothing_changes_reuses_the_selection():
    """The scheduler re-evaluates its rule only when its result can change: not at the steps in
    between, where every request runs and nothing joins, finishes, pauses or is canceled."""
    model = DiffusionModel.from_config(RowWise(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=None))
    for k in range(4):
        engine.add(Request(k, f"o{k}", seed=k, start=0, count=2, steps=10 + k, labels=[0, 1]))
    scheduler = engine.scheduler
    replans = []
    original = scheduler.schedule

    def schedule():
        selection, replanned = original()
        replans.append(replanned)
        return selection, replanned

    scheduler.schedule = schedule
    run(engine)
    # re-evaluated at the first step and after each of the four finishes (the last leaves none)
    assert replans == [True] + [False] * 9 + [True, True, True]
    assert scheduler.clock == 13


class Scaled(torch.nn.Module):
    """A row-wise network whose noise predictions put x0 far outside [-1, 1], where clipping acts."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x, t, labels=None):
        return -self.k * x


def _engine_equals_samplers_told(model: DiffusionModel, requests: list[Request], **x0_settings) -> dict:
    """Run `requests` on the engine and check each against Sampler.sample told the model's x̂₀
    settings (clip_sample, thresholding) directly, bit for bit; returns {id: Finished}."""
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None))
    done = run(engine, {0: requests})
    for r in requests:
        sampler = make_sampler(r.sampler, model.schedule, **x0_settings, **r.options)
        expected = sampler.sample(
            model.eps,
            model.image_shape,
            steps=r.steps,
            noise=ImageNoise([r.seed] * r.count, [0, 1]),
            class_labels=torch.tensor(list(r.labels)),
        )
        assert torch.equal(done[r.id].samples, expected), r.id
    return done


def test_the_models_clip_sample_setting_reaches_the_engines_samplers():
    """A model folder whose scheduler says clip_sample: false (DiffusionModel.clip_sample) is
    sampled unclipped by the engine, as by Sampler.sample told the same; clipping would differ."""
    unclipped = DiffusionModel.from_config(Scaled(4.0), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    unclipped.clip_sample = False
    requests = [
        Request("ddim", "a", seed=1, start=0, count=2, steps=6, labels=[0, 1]),
        Request("ddpm", "b", seed=2, start=0, count=2, steps=6, sampler="ddpm", labels=[1, 0]),
    ]
    done = _engine_equals_samplers_told(unclipped, requests, clip_sample=False)
    for r in requests:
        assert not torch.allclose(done[r.id].samples, reference(unclipped, r), atol=1e-3), r.id  # clipped differs


def test_the_models_dynamic_thresholding_reaches_the_engines_samplers():
    """A model folder whose scheduler says thresholding: true (DiffusionModel.thresholding) is
    sampled with it by the engine, by every sampler, as by Sampler.sample told the same; the
    network's large x0 predictions make it differ from clipping."""
    model = DiffusionModel.from_config(Scaled(4.0), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    model.thresholding = Thresholding(0.9, 2.0)
    requests = [
        Request("ddim", "a", seed=1, start=0, count=2, steps=6, labels=[0, 1]),
        Request("ddpm", "b", seed=2, start=0, count=2, steps=6, sampler="ddpm", labels=[1, 0]),
        Request("dpm", "c", seed=3, start=0, count=2, steps=6, sampler="dpmpp_2m", labels=[0, 0]),
    ]
    done = _engine_equals_samplers_told(model, requests, thresholding=Thresholding(0.9, 2.0))
    clipped = reference(model, requests[0])
    assert not torch.allclose(done[requests[0].id].samples, clipped, atol=1e-3)


def test_an_engine_whose_last_rows_are_canceled_lets_go_of_their_batch(model):
    engine = DenoisingEngine(model, EngineConfig(max_batch=64, latency_slack=None))
    engine.add(Request("a", "a", seed=1, start=0, count=2, steps=6, labels=[0, 1]))
    engine.step()
    assert engine.resident_rows == 2  # the running batch's buffers
    engine.cancel("a")
    assert engine.step() == [] and engine.idle
    assert engine.resident_rows == 0
