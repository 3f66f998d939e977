"""The one Ray start-up of kd-detr and the helpers every Ray user shares (cache build, serving, compare).

Placement: a teacher actor takes one GPU when the driver sees CUDA and the cluster has GPUs, else
one CPU; its torch intra-op threads are the node's CPUs shared among the actors. Tensors cross the
object store as numpy arrays (zero-copy), never pickled torch tensors.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any, Optional

import numpy as np
import ray
import torch

__all__ = ["ensure_ray", "check_ray_reachable", "check_ray_answers", "connect_timeout", "REACH_TIMEOUT_S",
           "CONNECT_TIMEOUT_ENV", "CONNECT_TIMEOUT_S", "shutdown_ray", "use_gpus", "actor_options", "torch_threads",
           "to_numpy", "from_numpy", "wire_to_numpy", "wire_from_numpy"]

logger = logging.getLogger(__name__)


# How long the cluster's GCS port gets to accept a TCP connection before kd-detr gives up on an address
# (ray.init itself would retry a dead address for minutes).
REACH_TIMEOUT_S = 5.0

# How long a cluster's GCS gets to answer kd-detr's first request (something that is not Ray may accept TCP on a
# stale address's port, and a frozen head accepts TCP too; ray.init would retry either for many minutes).
CONNECT_TIMEOUT_ENV = "KD_DETR_RAY_CONNECT_TIMEOUT"
CONNECT_TIMEOUT_S = 30.0


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """``(host, port)`` of ``host:port``, ``[v6]:port`` or ``ray://host:port``; ``None`` if it has no port."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolve(address: str, source: str) -> str:
    """The ``host:port`` Ray will connect to for ``address``: ``auto`` is resolved the way ``ray.init``
    does (``$RAY_ADDRESS``, then the cluster of the last ``ray start``, recorded in
    ``/tmp/ray/ray_current_cluster``, then a running GCS process found with ``ps``)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # pragma: no cover - a Ray without this helper: let ray.init resolve it
        return address
    try:
        resolved = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as e:
        raise ValueError(f"cannot resolve the Ray address 'auto' (from {source}): no running Ray cluster found on this "
                         f"machine ({' '.join(str(e).split())}): start one with `ray start --head`, give its "
                         f"host:port, or unset RAY_ADDRESS to run a local Ray") from None
    return resolved or address


def check_ray_reachable(address: str, source: str = "--address", timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse a Ray address nothing answers at, in at most ``timeout`` seconds (``ray.init`` would wait for
    minutes): its GCS port (``ray://``: the client server's port) must accept a TCP connection.

    Args:
        address: ``host:port``, ``ray://host:port`` or ``auto``.
        source: where the address came from, for the message (``--address``, ``$RAY_ADDRESS``).

    Raises:
        ValueError: one line naming the address, where it came from and what to do.
    """
    target = _resolve(address, source)
    if target == "auto":  # pragma: no cover - unresolvable with this Ray: nothing to probe
        return
    fix = _fix(source)
    hp = _host_port(target)
    if hp is None:
        raise ValueError(f"the Ray address {target!r} (from {source}) is not host:port: {fix}")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as e:
        why = "no answer within {:g} s".format(timeout) if isinstance(e, socket.timeout) else \
            (e.strerror or str(e) or type(e).__name__)
        raise ValueError(f"cannot reach the Ray cluster at {target} (from {source}: {why}): {fix}") from None


def connect_timeout() -> float:
    """Seconds a Ray cluster gets to answer a join: ``$KD_DETR_RAY_CONNECT_TIMEOUT`` if set, else
    :data:`CONNECT_TIMEOUT_S` (30). Raises ``ValueError`` naming the variable if it is not a number > 0."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"${CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds > 0 (the wait for a Ray "
                         f"cluster to answer a join; default {CONNECT_TIMEOUT_S:g})")
    return value


def _fix(source: str) -> str:
    return ("start it with `ray start --head`, fix the address, or unset RAY_ADDRESS to run a local Ray"
            if source == "$RAY_ADDRESS" else
            "start it with `ray start --head`, fix the address, or leave out --address (and unset RAY_ADDRESS) "
            "to run a local Ray")


def _token_fix() -> str:
    return ("set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), or use "
            "RAY_ADDRESS=auto on its head node")


def check_ray_answers(address: str, source: str = "--address", timeout: Optional[float] = None) -> None:
    """Refuse a Ray address whose port accepts TCP but where no Ray cluster answers, in at most ``timeout``
    seconds: kd-detr asks the GCS for its cluster id (the first request ``ray.init`` makes, which ``ray.init``
    would retry for many minutes against a stale address whose port another service now uses, or a frozen
    head), with Ray's own channel (its TLS and token settings).

    Args:
        address: ``host:port`` or ``auto`` (a ``ray://`` client address is left to Ray, whose client gives up
            after 30 s by itself).
        source: where the address came from, for the message (``--address``, ``$RAY_ADDRESS``).
        timeout: seconds to wait for the answer; default :func:`connect_timeout`, i.e. the environment
            variable ``KD_DETR_RAY_CONNECT_TIMEOUT`` (seconds, > 0), else 30.

    Raises:
        ValueError: one line naming the address, where it came from and the cause: no answer in time, not a
            Ray GCS, or (only then a hint about tokens) a cluster that refuses this client's token.
    """
    if "://" in address:
        return
    timeout = connect_timeout() if timeout is None else float(timeout)
    target = _resolve(address, source)
    try:
        import grpc
        from ray._private.gcs_utils import create_gcs_channel
        from ray._private.services import canonicalize_bootstrap_address
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError as e:  # pragma: no cover - a Ray without these internals: ray.init alone decides
        logger.debug("no GCS probe before joining %s: %s", target, e)
        return
    try:
        gcs = canonicalize_bootstrap_address(target) or target  # what ray.init dials: localhost -> this node's IP
    except Exception:  # noqa: BLE001 - Ray's own parsing; ray.init reports a bad address itself
        gcs = target
    origin = f"from {source}" + (f", resolved from {address!r}" if address != target else "") + \
        (f"; Ray dials {gcs}" if gcs != target else "")
    channel = create_gcs_channel(gcs)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
    except grpc.RpcError as e:
        code = e.code()
        details = " ".join(str(e.details() or "").split())
        details = details if len(details) <= 200 else details[:197] + "..."
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ValueError(
                f"no Ray cluster answered at {target} ({origin}) within {timeout:g} s: something accepts "
                f"connections there but no Ray GCS answers (a stale address whose port another service now uses, "
                f"or a frozen head): {_fix(source)}; ${CONNECT_TIMEOUT_ENV}=SECONDS waits longer") from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise ValueError(f"the Ray cluster at {target} ({origin}) refuses this client's authentication "
                             f"({details}): {_token_fix()}") from None
        raise ValueError(f"no Ray cluster at {target} ({origin}): what answers there is not a Ray GCS "
                         f"({code.name}: {details}): {_fix(source)}") from None
    finally:
        channel.close()


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> bool:
    """Connect to Ray unless the caller already did: the one Ray start-up of kd-detr (cache builds,
    teacher serving, compare). Returns ``True`` if this call started it (the caller then shuts it down
    with :func:`shutdown_ray` when done; a session someone else opened is left alone).

    ``address`` (or ``$RAY_ADDRESS``) joins an existing cluster, after :func:`check_ray_reachable` made
    sure its port accepts TCP (a dead address fails in seconds) and :func:`check_ray_answers` that a Ray GCS
    answers there within ``$KD_DETR_RAY_CONNECT_TIMEOUT`` seconds (default 30; a port another service now
    uses, or a frozen head, fails then instead of ``ray.init`` retrying for many minutes); otherwise (or with
    ``address="local"``) a local one with ``num_cpus`` CPUs (default: this machine's) and no dashboard is
    started (it costs seconds and memory for nothing here), even when a ``ray start`` cluster is recorded
    on this machine. Ray's own logging is kept at warnings.
    """
    if ray.is_initialized():
        return False
    env = os.environ.get("RAY_ADDRESS") or None
    source = "--address" if address else "$RAY_ADDRESS"
    address = address or env
    if address and address != "local":
        timeout = connect_timeout()
        check_ray_reachable(address, source, timeout=min(REACH_TIMEOUT_S, timeout))
        check_ray_answers(address, source, timeout=timeout)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            # the GCS answered (checked above), so a token problem was reported there already; hint at tokens
            # only where Ray's own words say so (a ray:// client address is not probed)
            why = " ".join(str(e).split())[:200]
            hint = (_token_fix() if any(w in why.lower() for w in ("auth", "token")) else
                    "check that this machine reaches the cluster's nodes and runs its Ray version "
                    f"(here ray {ray.__version__})")
            raise ValueError(f"cannot join the Ray cluster at {address} (from {source}): {why}: {hint}") from None
    else:
        # address="local": a new local Ray, never the cluster of an old `ray start` (whose record may be stale)
        quiet = _QuietTokenNotice()
        auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_log.addFilter(quiet)
        try:
            ray.init(address="local", num_cpus=int(num_cpus or os.cpu_count() or 1), include_dashboard=False,
                     logging_level=logging.WARNING)
        finally:
            auth_log.removeFilter(quiet)
    return True


class _QuietTokenNotice(logging.Filter):
    """Drops Ray's notice that a cluster it starts uses token authentication: for the private local Ray of one
    kd-detr command it asks nothing of the user (a cluster the user starts with `ray start` still says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def shutdown_ray(started: bool) -> None:
    """Shut Ray down if :func:`ensure_ray` started it (``started``)."""
    if started and ray.is_initialized():
        ray.shutdown()


def use_gpus() -> bool:
    """Put teacher actors on GPUs: the driver sees CUDA and the cluster has GPUs to hand out."""
    return torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) >= 1


def actor_options(num_gpus: Optional[float] = None) -> tuple[dict[str, Any], str]:
    """``(ray .options(...), device)`` of a teacher actor: one GPU each when :func:`use_gpus` (or
    ``num_gpus`` of one, e.g. ``0.5`` to share a GPU), else one CPU."""
    if num_gpus is None:
        num_gpus = 1 if use_gpus() else 0
    if num_gpus > 0:
        return {"num_gpus": num_gpus}, "cuda"
    return {"num_cpus": 1}, "cpu"


def torch_threads(num_actors: int, num_threads: Optional[int] = None) -> int:
    """Intra-op threads of one actor: the CPUs this process may use shared among the actors (Ray itself
    sets ``OMP_NUM_THREADS=1`` in workers, which would leave a CPU teacher on one core).

    Keep ``actors * threads`` at most the free cores: OpenMP threads spin at barriers, and an
    oversubscribed machine makes a 2-thread forward many times slower than a 1-thread one.
    """
    if num_threads:
        return int(num_threads)
    try:
        cpus = len(os.sched_getaffinity(0))  # the container's / taskset's CPUs, not the host's
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, int(num_actors)))


def to_numpy(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """CPU numpy view (Ray serialises numpy arrays zero-copy; torch tensors are pickled)."""
    return None if t is None else t.detach().cpu().numpy()


def from_numpy(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    """Tensor from an array out of the object store; those are read-only, so copy them then (torch
    refuses to wrap a read-only buffer without a warning, and a later in-place op would fail)."""
    if a is None:
        return None
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def wire_to_numpy(wire: dict[str, Any]) -> dict[str, np.ndarray]:
    """A :meth:`TeacherOutputs.to_wire` dict as numpy arrays for the object store."""
    return {k: to_numpy(v) for k, v in wire.items()}


def wire_from_numpy(wire: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`wire_to_numpy`."""
    return {k: from_numpy(v) for k, v in wire.items()}
