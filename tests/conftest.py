"""Shared fixtures: one small synthetic COCO data set per test session."""

from __future__ import annotations

import os

# Before Ray is first imported (it reads this once): the shared Ray session's autoscaler would otherwise print
# "No available node types can fulfill resource request" to this process's stdout for minutes after a test that
# asks for a GPU on purpose, into the output of whatever CLI test runs then.
os.environ.setdefault("RAY_SCHEDULER_EVENTS", "0")
# No test reaches the network: downloads (kd_detr/download.py) and Hub ids are offline unless a test serves the
# file itself on 127.0.0.1 and lifts this (tests/test_download.py).
os.environ.setdefault("KD_DETR_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: keep intra-op threads at 2 so timings and results are stable across machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A tiny synthetic COCO tree (24 train / 8 val images at 64 px)."""
    from kd_detr.data import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, num_train=24, num_val=8, image_size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, no dashboard) shared by every test that needs Ray: starting one costs
    ~6 s, so tests share it; each test kills the actors it made."""
    import logging

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture
def no_ray_init(monkeypatch):
    """Ray looks not started in this process (the shared session may be), and reaching ``ray.init`` fails the
    test: for the checks kd-detr makes before joining a cluster."""
    from kd_detr.teacher import ray_session

    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: False)

    def init(*a, **kw):
        raise AssertionError(f"ray.init reached with {a} {kw}")

    monkeypatch.setattr(ray_session.ray, "init", init)
