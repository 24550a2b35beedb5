"""Step graphs (undiffuse.step_graph): the engine's rows in static buffers, each step one replay.
On a CPU the step runs on the same buffers without being recorded, which is what these tests
check: the buffers' handling (loads at joins, pauses, finishes, cancels, twins switching, tables
growing) changes no image. Recording and replaying on CUDA: tests/core/test_gpu.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.core.test_engine import REQUESTS, TINY, WHOLE, RowWise, reference, run
from undiffuse import DiffusionModel, ModelConfig, ScheduleConfig
from undiffuse.engine import DenoisingEngine, EngineConfig, Request
from undiffuse.step_graph import GraphKey, StepGraph

GRAPHS = {"step_graphs": True, **WHOLE}


def _rowwise(interval: tuple[float, float] | None = None) -> DiffusionModel:
    config = ModelConfig(TINY, ScheduleConfig(num_timesteps=200), guidance_interval=interval)
    return DiffusionModel.from_config(RowWise(), config)


@pytest.fixture
def replays(monkeypatch) -> list[GraphKey]:
    """The key of every step graph replayed, in order."""
    seen: list[GraphKey] = []
    original = StepGraph.replay

    def counted(self: StepGraph) -> None:
        seen.append(self.key)
        original(self)

    monkeypatch.setattr(StepGraph, "replay", counted)
    return seen


def _by_sampler(name: str) -> list[Request]:
    return [r for r in REQUESTS if r.sampler == name and r.options.get("eta", 0.0) == 0.0]


@pytest.mark.parametrize(
    "group",
    [
        [r for r in REQUESTS if r.sampler == "ddim" and not r.options],  # guided and plain, joining late
        [REQUESTS[4], replace(REQUESTS[4], id="ddpm-2", seed=9, steps=6), replace(REQUESTS[3], id="eta-2")],  # noise
        [r for r in REQUESTS if r.sampler.startswith("dpmpp")],  # histories, a guided one
    ],
    ids=["ddim", "noise", "multistep"],
)
def test_graph_steps_equal_the_sampler_bit_for_bit(group, replays):
    """Requests of one kind arriving at different steps: most steps replay a step graph (a
    request with a new step count grows the tables, which makes a new graph), and every image
    is the one-request sampler's, bit for bit; a model with a guidance interval switches the
    guided rows' twins on and off, and their steps leave the graph and come back."""
    for interval in (None, (0.3, 1.5)):
        rowwise = _rowwise(interval)
        engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **GRAPHS))
        replays.clear()
        done = run(engine, {0: group[:1], 2: group[1:2], 4: group[2:]})
        assert set(done) == {r.id for r in group}
        for r in group:
            assert torch.equal(done[r.id].samples, reference(rowwise, r)), (interval, r.id)
        total = max(r.steps + k for r, k in zip(group, (0, 2, 4, 4, 4), strict=False))
        assert len(replays) >= total // 3, (len(replays), total)  # not a path that never ran
        assert len({key for key in replays}) >= 2  # joins changed the graph
    noise = any(r.sampler == "ddpm" or r.options for r in group)
    assert all(key.noise == noise for key in replays)
    assert any(key.history for key in replays) == any(r.sampler.startswith("dpmpp") for r in group)
    assert any(key.guided for key in replays) == any(r.guidance_scale != 1.0 for r in group)


@pytest.mark.parametrize("interval", [None, (0.3, 1.5)], ids=["guided-everywhere", "guidance-interval"])
def test_every_step_of_a_mixed_batch_replays_a_graph(interval, replays):
    """Every sampler at once, guided rows with their twins (switching at the interval's edges),
    samplers that draw noise beside ones that do not: each step is one replay, and every image
    is the one-request sampler's bit for bit."""
    rowwise = _rowwise(interval)
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **GRAPHS))
    steps = []
    step = engine.step
    engine.step = lambda: steps.append(1) or step()
    done = run(engine, {0: REQUESTS[:2], 2: REQUESTS[2:4], 5: REQUESTS[4:]})
    for r in REQUESTS:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    assert len(replays) == len(steps) > 10
    assert any(k.guided for k in replays) and any(not k.guided for k in replays)  # twins on and off
    assert any(k.noise for k in replays)


@pytest.mark.parametrize("error", ["capture", "memory"])
def test_a_graph_that_cannot_be_recorded_leaves_its_steps_to_the_launched_path(monkeypatch, caplog, error):
    """Recording fails: the engine logs it and launches the steps op by op, and no image
    changes. An op a CUDA graph cannot hold would fail every graph alike: step graphs go off.
    Running out of memory is that bucket's: its key is launched from then on, others still
    record."""
    rowwise = _rowwise()
    failures = []

    def refuse(self: StepGraph) -> None:
        failures.append(self.key)
        if error == "memory":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraph, "recorded", property(lambda self: False))
    monkeypatch.setattr(StepGraph, "record", refuse)
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **GRAPHS))
    with caplog.at_level("WARNING", logger="undiffuse.engine"):
        done = run(engine, {0: REQUESTS[:2], 3: REQUESTS[2:4]})
    for r in REQUESTS[:4]:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    assert "not recorded" in caplog.text
    if error == "capture":
        assert failures and len(failures) == 1 and not engine.step_graphs
    else:
        assert len(failures) == len(set(failures)) >= 2 and engine.step_graphs  # each key tried once
        assert engine._unrecordable == set(failures)


def test_tables_that_outgrow_their_capacity_make_graphs_record_again(monkeypatch, replays):
    """New (sampler, steps) pairs are written into the timestep and coefficient tables in place;
    past their capacity the tables are new tensors, and a graph made with the old ones is made
    again rather than replayed on a stale table. Every image is still the sampler's."""
    import undiffuse.engine

    monkeypatch.setattr(undiffuse.engine, "TABLE_CAPACITY", 16)
    rowwise = _rowwise()
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None, **GRAPHS))
    group = [r for r in REQUESTS if r.sampler == "ddim" and not r.options]  # 12 and 10 steps: 24 entries
    made = []
    original = StepGraph.__init__
    monkeypatch.setattr(StepGraph, "__init__", lambda self, *a, **k: made.append(1) or original(self, *a, **k))
    done = run(engine, {0: group[:1], 2: group[1:]})
    assert engine._ts_table.shape[0] == 32 and engine._table_len == sum(
        r.steps + 1 for r in {r.steps: r for r in group}.values()
    )
    for r in group:
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    assert len(made) >= 2 and len(replays) > 10


def _parks(engine: DenoisingEngine) -> list[tuple[int, bool]]:
    """(requests paused, whether they were the whole old batch) at every re-assembly."""
    seen: list[tuple[int, bool]] = []
    park = engine._park

    def spy(old, paused, *args):
        seen.append((len(paused), len(paused) == len(old.slots)))
        park(old, paused, *args)

    engine._park = spy
    return seen


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_rows_paused_out_of_a_graph_come_back_unchanged(replays, sampler):
    """Requests taking turns: their rows are parked out of a graph's buffers (which the next
    replay overwrites) and loaded back, and every image is the sampler's. First the whole batch
    parked while a shorter request takes the same graph (its step count already in the tables:
    a request canceled before it ran put it there), then three requests in a budget of two;
    a multistep sampler's histories are parked and loaded with its rows."""
    rowwise = _rowwise()
    p1 = Request("p1", "a", seed=1, start=0, count=2, steps=9, labels=[0, 1], sampler=sampler)
    p2 = Request("p2", "b", seed=2, start=0, count=2, steps=12, labels=[1, 2], sampler=sampler)
    p3 = Request("p3", "c", seed=3, start=4, count=2, steps=7, labels=[2, 0], sampler=sampler)
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=2, keep_samples=True, latency_slack=None, **GRAPHS))
    parks = _parks(engine)
    engine.add(p1)
    engine.add(replace(p3, id="registers-7-steps"))
    engine.cancel("registers-7-steps")
    done = run(engine, {1: [p3]})
    assert parks == [(1, True)]  # p1 left the graph whole, p3 took it
    for r in (p1, p3):
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=4, keep_samples=True, latency_slack=None, **GRAPHS))
    parks = _parks(engine)
    done = run(engine, {0: [p1], 1: [p2, p3]})
    assert any(n for n, _ in parks), parks
    for r in (p1, p2, p3):
        assert torch.equal(done[r.id].samples, reference(rowwise, r)), r.id
    assert len(replays) > 20


@pytest.mark.slow
def test_graph_steps_equal_launch_by_launch_steps_with_the_unet(model_unet):
    """With the real UNet (whose rows depend on the batch's shape, not on the other rows' values):
    a graph's padding rows (zeros) in place of the copies of the last row change no image."""
    group = [r for r in REQUESTS if r.sampler == "ddim"] + [replace(REQUESTS[4], id="ddpm-solo")]
    out = {}
    for stepping in ({**WHOLE}, GRAPHS):
        engine = DenoisingEngine(
            model_unet, EngineConfig(max_batch=16, keep_samples=True, latency_slack=None, **stepping)
        )
        out[bool(stepping.get("step_graphs"))] = run(engine, {0: group[:2], 3: group[2:]})
    for r in group:
        assert torch.equal(out[True][r.id].samples, out[False][r.id].samples), r.id
        assert (out[True][r.id].pixels() == out[False][r.id].pixels()).all(), r.id


@pytest.fixture(scope="module")
def model_unet() -> DiffusionModel:
    from undiffuse import UNet

    torch.manual_seed(0)
    net = UNet(TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return DiffusionModel.from_config(net, ModelConfig(TINY, ScheduleConfig(num_timesteps=200))).eval()


def test_a_load_pads_with_rows_that_never_advance():
    key = GraphKey(rows=4, terms=frozenset({"x"}), noise=True, history=False, previews=True)
    graph = StepGraph(key, (1, 2, 2), conditional=True, device=torch.device("cpu"), step=lambda g: None, tables=())
    graph.x.fill_(7.0)
    graph.rows.fill_(99)  # a finished row's entry, past its list
    graph.load(torch.ones(3, 1, 2, 2), torch.tensor([5, 6, 7]), torch.tensor([5, 5, 5]), torch.tensor([1, 2, 0]),
               torch.tensor([3, 3, 3]), torch.tensor([0, 1, 2]))  # fmt: skip
    assert graph.n == 3
    assert graph.x[:3].eq(1).all() and graph.x[3].eq(0).all()
    assert graph.rows.tolist() == [5, 6, 7, 0] and graph.starts.tolist() == [5, 5, 5, 0]
    assert graph.live.tolist() == [1, 1, 1, 0] and graph.labels.tolist() == [1, 2, 0, 0]
    assert graph.seeds.tolist() == [3, 3, 3, 0] and graph.x0.eq(0).all()
    with pytest.raises(ValueError, match="guidance goes with a guided graph"):
        graph.load(torch.ones(1, 1, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                   guidance=(torch.zeros(4, dtype=torch.long),) * 3 + (torch.zeros(4, 1, 1, 1),))  # fmt: skip
    with pytest.raises(ValueError, match="5 rows do not fit a graph of 4"):
        graph.load(torch.ones(5, 1, 2, 2), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))


def test_step_graphs_are_off_unless_asked_on_a_cpu():
    engine = DenoisingEngine(_rowwise(), EngineConfig(max_batch=8))
    assert not engine.step_graphs
    engine.add(REQUESTS[0])
    engine.step()
    assert engine._batch.graph is None
