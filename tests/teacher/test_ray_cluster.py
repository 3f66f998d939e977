"""A two-node Ray cluster on this machine: `kd-detr cache` (the stream pipeline) uses both nodes, the cache
verifies, and `kd-detr compare` runs its recipes on the same cluster.

The cluster is started the way a user starts one, with the ``ray`` CLI of this interpreter: ``ray start
--head`` (node ``node1``: 1 CPU) and ``ray start --address HEAD`` (node ``node2``: 1 CPU and a ``node2``
resource). Both run in a private ``--temp-dir`` (``kdrc-*`` in ``$KD_DETR_RAY_TMP``, default the system temp folder: Ray's socket paths must stay short) with
their own ports, so they neither see nor disturb another Ray on the machine (the shared local Ray of the
other tests may still be running in this very process). Everything the test's commands connect with comes
from the environment: ``RAY_ADDRESS`` (the head), and token authentication with a token of this test
(``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``), so the user's ``~/.ray/auth_token`` is neither needed
nor used.

Stopping: ``ray stop`` stops *every* Ray process of the user on the machine (it would kill the shared
``ray_session`` of the other tests), so the fixture stops exactly its own nodes instead. Each ``ray start``
runs in a new session (``setsid``); every process it spawns (GCS, raylets, agents, workers, actors) stays in
that session, which is read from ``/proc/PID/stat`` (Ray renames its processes with ``setproctitle``, which
wipes ``/proc/PID/environ``, so an environment mark alone would miss ``ray::*`` processes). Teardown sends
SIGTERM, then SIGKILL after a grace period, to every process of those sessions (or whose command line names
the private temp dir) and fails if any is left.

Runtime on the 2-core development machine: 43-55 s (cluster start ~8 s, cache ~19 s, compare ~18 s,
stop ~2.5 s).
"""

from __future__ import annotations

import ast
import csv
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.runs import save_teacher

pytestmark = [pytest.mark.cluster, pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the cluster's processes in /proc")]

RAY = Path(sys.executable).with_name("ray")  # the ray CLI of this interpreter's environment
MARK = f"KD_DETR_RAY_CLUSTER_TEST={os.getpid()}"  # extra mark on every process the test starts
NODE_CPUS = 1
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # Ray's minimum is 75 MiB; the default (30% of RAM) is far too much
START_TIMEOUT_S = 120
STOP_GRACE_S = 2.0


@dataclass
class Cluster:
    address: str  # host:port of the head's GCS
    temp_dir: Path  # the cluster's private --temp-dir (session logs under session_*/logs)
    env: dict[str, str]  # environment of a command that uses the cluster (RAY_ADDRESS and the token set)
    nodes: dict[str, str]  # "node1" / "node2" -> Ray node id (hex)


# ------------------------------------------------------------------------------------------ processes


def _proc_info(pid: int) -> tuple[int, str, str]:
    """``(session id, state, command line)`` of ``pid``; raises OSError once it is gone."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return int(fields[3]), fields[0], cmd


def _has_mark(pid: int) -> bool:
    try:
        return MARK.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cluster_processes(sessions: list[int], temp_dir: Path) -> dict[int, str]:
    """pid -> command line of every live process of the cluster: in the session of one of its ``ray start``
    commands, naming its temp dir on the command line, or carrying the test's mark (zombies are gone)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        pid = int(d.name)
        try:
            sid, state, cmd = _proc_info(pid)
        except (OSError, ValueError, IndexError):
            continue
        if state == "Z":
            continue
        if sid in sessions or str(temp_dir) in cmd or _has_mark(pid):
            found[pid] = cmd.strip()
    return found


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_cluster(sessions: list[int], temp_dir: Path) -> dict[int, str]:
    """SIGTERM every process of the cluster, SIGKILL what is left after ``STOP_GRACE_S``; returns the
    processes still alive after that (none, normally)."""
    procs = _cluster_processes(sessions, temp_dir)
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while procs and time.monotonic() < deadline:
        time.sleep(0.2)
        procs = _cluster_processes(sessions, temp_dir)
    for _ in range(3):  # a raylet may still spawn a worker while it dies: look again after each round
        if not procs:
            break
        _signal_all(procs, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while procs and time.monotonic() < deadline:
            time.sleep(0.2)
            procs = _cluster_processes(sessions, temp_dir)
    return procs


# ------------------------------------------------------------------------------------------- cluster


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env(temp_dir: Path, token: Path) -> dict[str, str]:
    """This process's environment without any Ray address or auth setting of the caller, plus the test's
    own token authentication and mark (inherited by every process of the cluster and the commands)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    key, value = MARK.split("=")
    env.update({key: value, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_SCHEDULER_EVENTS": "0"})
    return env


def _ray_start(args: list[str], env: dict[str, str], sessions: list[int]) -> str:
    """Run ``ray start ARGS`` in a new session (recorded in ``sessions`` before it can spawn anything
    that teardown must find); returns its output."""
    proc = subprocess.Popen([str(RAY), "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    sessions.append(proc.pid)  # setsid: the session id is the pid
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"`ray start {' '.join(args)}` did not finish in {START_TIMEOUT_S} s:\n{out[-3000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"`ray start {' '.join(args)}` failed ({proc.returncode}):\n{out[-3000:]}")
    return out


def _nodes(address: str, env: dict[str, str], want: int) -> dict[str, str]:
    """``{"node1": id, "node2": id}`` from ``ray status -v`` (each node's section lists its custom
    resource), once ``want`` nodes are up."""
    deadline = time.monotonic() + 60
    out = ""
    while time.monotonic() < deadline:
        res = subprocess.run([str(RAY), "status", "--address", address, "-v"], env=env, capture_output=True,
                             text=True, timeout=60)
        out = res.stdout + res.stderr
        nodes = {}
        for block in re.split(r"(?m)^(?=Node: )", out)[1:]:
            node_id = re.match(r"Node: ([0-9a-f]+)", block).group(1)
            for name in re.findall(r"(?m)^\s*[\d.]+/[\d.]+ (node[12])\s*$", block):
                nodes[name] = node_id
        if res.returncode == 0 and len(nodes) == want:
            return nodes
        time.sleep(1)
    raise RuntimeError(f"the cluster at {address} did not show {want} nodes in `ray status -v`:\n{out[-3000:]}")


@pytest.fixture
def two_node_cluster():
    """A two-node Ray cluster on this machine (head ``node1``, worker ``node2``, 1 CPU each), stopped and
    checked for leftover processes at teardown."""
    if not RAY.is_file():
        pytest.skip(f"no ray CLI beside {sys.executable}")
    temp_dir = Path(tempfile.mkdtemp(prefix="kdrc-", dir=os.environ.get("KD_DETR_RAY_TMP")))  # short: Ray's socket paths are limited
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = _base_env(temp_dir, token)
    sessions: list[int] = []
    try:
        gcs, client, dashboard, agent1, agent2 = _free_ports(5)
        common = ["--num-cpus", str(NODE_CPUS), "--num-gpus", "0", "--object-store-memory", str(OBJECT_STORE_BYTES),
                  "--temp-dir", str(temp_dir), "--disable-usage-stats",
                  # workers on random ports (Ray's default range is shared by both raylets)
                  "--min-worker-port", "0", "--max-worker-port", "0"]
        _ray_start(["--head", "--port", str(gcs), "--ray-client-server-port", str(client),
                    "--include-dashboard=false", "--dashboard-port", str(dashboard),
                    "--dashboard-agent-listen-port", str(agent1), "--resources", '{"node1": 1}', *common],
                   env, sessions)
        # the head's address as Ray records it for this temp dir (the node IP Ray picked, the GCS port)
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        assert address.endswith(f":{gcs}"), address
        _ray_start(["--address", address, "--dashboard-agent-listen-port", str(agent2),
                    "--include-log-monitor=false",  # one log monitor per machine: the head's reads both nodes' logs
                    "--resources", '{"node2": 1}', *common], env, sessions)
        nodes = _nodes(address, env, 2)
        yield Cluster(address=address, temp_dir=temp_dir, env={**env, "RAY_ADDRESS": address}, nodes=nodes)
    finally:
        left = _stop_cluster(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster survived SIGKILL: {list(left.values())[:5]}"


# --------------------------------------------------------------------------------------------- test


def _kd_detr(args: list[str], cluster: Cluster, cwd: Path, timeout: float = 600) -> tuple[int, str, int]:
    """``(exit status, stdout + stderr, pid)`` of ``kd-detr ARGS`` run against ``cluster`` (RAY_ADDRESS)."""
    proc = subprocess.Popen([sys.executable, "-m", "kd_detr", *args], cwd=cwd, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"kd-detr {args[0]} did not finish in {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out, proc.pid


def _images_by_node(output: str) -> dict[str, int]:
    """The ``images_by_node`` of the summary ``kd-detr cache`` prints (``cache OUT: {...}``)."""
    m = re.search(r"""['"]images_by_node['"]\s*:\s*(\{[^{}]*\})""", output)
    assert m, f"kd-detr cache printed no images_by_node:\n{output[-3000:]}"
    return ast.literal_eval(m.group(1))


def test_cache_and_compare_on_a_two_node_cluster(two_node_cluster, synth_data, tmp_path):
    cluster = two_node_cluster
    assert set(cluster.nodes) == {"node1", "node2"} and len(set(cluster.nodes.values())) == 2
    teacher = save_teacher(tmp_path, synth_data)
    data = ["--data", str(synth_data), "--image-size", "64"]

    # 1. the teacher cache with the stream pipeline (Ray Data): 2 teacher actors of 0.75 CPU on a cluster of two
    #    1-CPU nodes, so one actor on each node, each beside the decode tasks' quarter CPU; 24 images x 1 view in
    #    6 shards, teacher batches of 2 views, so both actors get work
    cache = tmp_path / "cache"
    rc, out, _ = _kd_detr(["cache", "--teacher", "cond_detr_r10_tiny", "--teacher-checkpoint", str(teacher), *data,
                           "--out", str(cache), "--views", "1", "--actors", "2", "--images-per-shard", "4",
                           "--pipeline", "stream", "--teacher-batch-size", "2", "--no-progress"], cluster, tmp_path)
    assert rc == 0, out[-4000:]
    assert "pipeline stream" in out, out[-4000:]
    by_node = _images_by_node(out)
    assert set(by_node) == set(cluster.nodes.values()), (by_node, cluster.nodes)  # teacher work on each node
    assert all(n > 0 for n in by_node.values()) and sum(by_node.values()) == 24, by_node

    # 2. the cache is complete and intact
    from kd_detr.teacher.cache.verify import verify_cache

    assert verify_cache(cache) == []

    # 3. compare on the same cluster, distilling from that cache, with the default --parallel and paths relative
    #    to the command's folder: the runs are Ray tasks on the nodes, whose workers run in the folder of
    #    `ray start`, and each asks for at most the CPUs of one node (both once made the command fail or hang)
    cmp_out = tmp_path / "cmp"
    rc, out, pid = _kd_detr(["compare", "--teacher-cache", "cache", "--student", "cond_detr_r10_tiny",
                             "--student-opt", "num_queries=10", "--student-opt", "dim_feedforward=128",
                             "--recipes", "baseline,d3etr", "--budget", "2", "--eval-points", "1", *data,
                             "--num-workers", "0", "--out", "cmp", "--no-progress",
                             "--set", "train.batch_size=4"], cluster, tmp_path)
    assert rc == 0, out[-4000:]
    assert "| baseline |" in out and "| d3etr |" in out, out[-4000:]
    rows = {r["recipe"]: r for r in csv.DictReader((cmp_out / "comparison.csv").open())}
    assert set(rows) == {"baseline", "d3etr"} and all(r["ok"] == "1" for r in rows.values()), rows
    assert "| baseline |" in (cmp_out / "comparison.md").read_text()
    for recipe in rows:
        assert (cmp_out / "runs" / recipe / "seed0" / "metrics.json").is_file()
    # compare's driver joined this cluster (a local Ray of its own would log in Ray's default temp folder, not here)
    drivers = list(cluster.temp_dir.glob(f"session_*/logs/python-core-driver-*_{pid}.log"))
    assert drivers, f"kd-detr compare (pid {pid}) left no driver log in {cluster.temp_dir}: it did not join the cluster"
