"""The one Ray actor that runs a frozen teacher: it serves padded batches to a running distillation
(:mod:`kd_detr.teacher.ray_serving`) and computes cache shards on a view plan (:mod:`kd_detr.teacher.cache.build`).

Both uses load the same weights (:func:`~kd_detr.teacher.loading.load_teacher`) and run
:class:`~kd_detr.teacher.inprocess.InProcessTeacher` on float32 inputs, so they give the in-process
teacher's numbers (on CPU with the same intra-op thread count: reductions split over another number of
threads round differently, ~1e-6). Results cross the object store in the wire format of
:meth:`~kd_detr.teacher.outputs.TeacherOutputs.to_wire`, as numpy.

The actor is created with ``max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES`` (3 each): a
process that dies (OOM killer, preempted node) is restarted (it reloads the teacher) and its pending calls
are retried; a forward pass has no side effects, so a retry returns the same result. An actor that keeps
dying is not restarted forever: once its restarts are used up, the call fails and the callers raise
:class:`TeacherActorError` (:func:`teacher_actor_error`), one line saying what to check.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
import torch

from kd_detr.errors import UserError
from kd_detr.data import CocoDetection, LabelMap
from kd_detr.data.transforms import AugmentationPolicy
from kd_detr.data.view_plan import ViewPlan
from kd_detr.data.yolo import YoloSplit
from kd_detr.matcher import HungarianMatcher, indices_to_assignment

from .loading import TeacherSpec, load_teacher, spec_from_dict, spec_to_dict
from .ray_session import from_numpy, to_numpy, torch_threads, wire_to_numpy
from .inprocess import InProcessTeacher

__all__ = ["TeacherWorker", "TeacherActor", "load_plan_data", "replay_view", "node_id", "TeacherActorError",
           "teacher_actor_error", "teacher_job", "plan_job", "MAX_RESTARTS", "MAX_TASK_RETRIES", "ACTOR_OPTIONS"]

# A dead teacher process is restarted this many times (and a call it was running retried as often) before
# the run gives up: enough for a preempted node or a one-off OOM kill, few enough that a teacher which
# dies on every batch ends the run in seconds instead of hanging it.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3
ACTOR_OPTIONS = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES}


class TeacherActorError(UserError, RuntimeError):
    """A teacher actor is gone for good (restarts used up) or could not load its teacher."""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def teacher_actor_error(e: BaseException) -> TeacherActorError:
    """The one-line error of a failed actor call (``ray.exceptions.RayActorError`` / ``ActorDiedError``)."""
    msg = str(e)
    if getattr(e, "actor_init_failed", False):
        # an exception in __init__ (e.g. a bad checkpoint): Ray does not restart those; the original
        # error is the last "SomeError: ..." line of the remote traceback
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", ln)]
        cause = _one_line(errors[-1] if errors else (lines[-1] if lines else type(e).__name__))
        return TeacherActorError(f"the teacher actor could not start (last error: {cause}): check the teacher "
                                 "checkpoint and card, and that the data and checkpoint paths exist on every Ray node")
    detail = re.search(r"Worker exit detail: (.*?)(?: There are some potential root causes| Some common causes|$)",
                       " ".join(msg.split()))
    last = detail.group(1) if detail else (msg.strip().splitlines()[-1] if msg.strip() else type(e).__name__)
    return TeacherActorError(f"teacher actor died {MAX_RESTARTS + 1} times (last error: {_one_line(last)}): "
                             "check memory (OOM killer) and the teacher checkpoint")


def teacher_job(spec: TeacherSpec, attn_mode: str, label_map: Optional[LabelMap], device: str,
                actors: int = 1, num_threads: Optional[int] = None, features: bool = False) -> dict[str, Any]:
    """The plain-data arguments an actor loads its teacher from (a model would be pickled to every actor).

    ``features``: the teacher also returns its encoder output maps (feature distillation, ``--features`` caches).

    ``label_map``: the data's (only needed for an official checkpoint whose card says ``contiguous``).
    ``num_threads=None``: each actor takes its node's CPUs // ``actors`` (decided on the node)."""
    return {"spec": spec_to_dict(spec), "attn_mode": attn_mode,
            "label_map": label_map.to_dict() if label_map is not None else None,
            "device": device, "actors": int(actors), "num_threads": num_threads, "features": bool(features)}


def _absolute_source(ann_file: Any) -> Any:
    """An annotation source with an absolute path (a YOLO split is sent as it is: its YAML path is absolute)."""
    return ann_file if isinstance(ann_file, YoloSplit) else str(Path(ann_file).absolute())


def plan_job(dataset: CocoDetection, plan: ViewPlan) -> dict[str, Any]:
    """The plain-data description of a training set and its view plan, for actors that build cache shards
    (they rebuild both and check the plan's fingerprint)."""
    rep = dataset.report
    return {
        # absolute: actors run in the directory of `ray start` on a cluster, not the driver's
        "dataset": {"img_dir": str(Path(dataset.img_dir).absolute()), "ann_file": _absolute_source(dataset.ann_file),
                    "label_map": dataset.label_map.to_dict(), "strict": bool(dataset.strict),
                    # a data set built with validate_files dropped unreadable images: do the same
                    "validate_files": rep.num_kept_images != rep.num_images},
        "plan": {"num_views": plan.num_views, "seed": plan.seed, "policy": plan.policy.to_dict(),
                 "fingerprint": plan.fingerprint()},
    }


class TeacherWorker:
    """Body of :data:`TeacherActor` (a plain class too, so it can run in-process for debugging).

    Args:
        job: :func:`teacher_job`.
        data: :func:`plan_job`, for building cache shards (:meth:`run_shard`); ``None`` for serving.
        store: the cache's :meth:`StoreConfig.to_dict`, with ``data`` (or alone: a stream build's teacher stage,
            which gets its views replayed by another stage, :meth:`view_entry`).
    """

    def __init__(self, job: dict[str, Any], data: Optional[dict[str, Any]] = None,
                 store: Optional[dict[str, Any]] = None):
        torch.set_num_threads(torch_threads(job["actors"], job["num_threads"]))
        label_map = LabelMap.from_dict(job["label_map"]) if job["label_map"] is not None else None
        self.dataset = self.plan = self.store = None
        if data is not None:
            self.dataset, self.plan = load_plan_data(data)
            label_map = self.dataset.label_map
        if store is not None:
            from .cache.attention_codec import StoreConfig

            self.store = StoreConfig.from_dict(store)
        self.device = torch.device(job["device"])
        spec = spec_from_dict(job["spec"])
        model, _, _ = load_teacher(spec, label_map)
        self.teacher = InProcessTeacher(model.to(self.device), attn=job["attn_mode"], precision=spec.precision,
                                        features=job.get("features", False))
        self.matcher = HungarianMatcher()  # the teacher's own GT matching: default 2/5/2 costs

    def ping(self) -> int:
        """The worker's process id (a restarted actor answers with a new one)."""
        return os.getpid()

    def config(self):
        """The teacher's :class:`ModelConfig`."""
        return self.teacher.config

    def describe(self) -> dict[str, int]:
        """``{"layers", "queries", "classes"}`` of the teacher (a cache manifest's ``store`` sizes)."""
        c = self.teacher.config
        return {"layers": int(c.dec_layers), "queries": int(c.num_queries), "classes": int(c.num_classes)}

    def queries(self) -> np.ndarray:
        """``[Nt, d]`` the teacher's query_embed."""
        return to_numpy(self.teacher.model.learned_queries())

    def forward(self, images: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Serving: ``images [B,3,H,W]`` float32, ``mask [B,H,W]`` bool -> the wire dict as numpy."""
        out = self.teacher(from_numpy(images).to(self.device), from_numpy(mask).to(self.device))
        return wire_to_numpy(out.to_wire())

    @torch.no_grad()
    def view_entry(self, image: torch.Tensor, target: dict[str, torch.Tensor], index: int) -> dict[str, np.ndarray]:
        """Cache: the stored entry of one replayed view (``image [3,H,W]`` float32 and its ``target``, from
        :func:`replay_view`) of image ``index``, the view run alone: ``encode_batch(...)`` as numpy.
        ``gt_assignment [1,Nt]`` is the teacher's last-layer Hungarian matching to the view's targets;
        ``image_index [1]`` is ``index``. The one implementation of both cache builds (actor pool, stream)."""
        from .cache.attention_codec import encode_batch

        res = self.teacher.view(image.to(self.device))
        tgt = [{k: v.to(self.device) for k, v in target.items()}]
        idx = self.matcher({"pred_logits": res.logits[-1], "pred_boxes": res.boxes[-1]}, tgt)
        res.gt_assignment = indices_to_assignment(idx, res.num_queries)
        return wire_to_numpy(encode_batch(res, torch.tensor([int(index)], dtype=torch.int64), self.store))

    def compute(self, view: int, indices: list[int]) -> tuple[dict[int, dict[str, np.ndarray]], float]:
        """Cache: ``({i: view_entry(...)}, busy seconds)`` for view ``view`` of the images ``indices``, each
        replayed (:func:`replay_view`) and run alone; busy seconds: the time spent in :meth:`view_entry`
        (teacher forward, matching, encoding), which the build reports as the actors' busy fraction."""
        if self.dataset is None:
            raise RuntimeError("this teacher actor serves batches; it was not given a view plan to cache")
        out, busy = {}, 0.0
        for i in indices:
            image, target = replay_view(self.dataset, self.plan, int(i), view)
            t0 = time.perf_counter()
            out[int(i)] = self.view_entry(image, target, int(i))
            busy += time.perf_counter() - t0
        return out, busy

    def run_shard(self, name: str, view: int,
                  indices: list[int]) -> tuple[str, dict[int, dict[str, np.ndarray]], str, float]:
        """:meth:`compute` tagged with the shard name (``ActorPool`` returns results unordered) and the Ray node
        that computed it (hex id; ``""`` outside Ray), so the build can report the work done per node:
        ``(name, entries, node, busy seconds)``."""
        entries, busy = self.compute(view, indices)
        return name, entries, node_id(), busy


def load_plan_data(data: dict[str, Any]) -> tuple[CocoDetection, ViewPlan]:
    """The training set and view plan of a :func:`plan_job`, rebuilt in a worker process; a plan whose
    fingerprint is not the driver's raises :class:`~kd_detr.teacher.cache.manifest.CacheError`."""
    from .cache.manifest import CacheError

    d, p = data["dataset"], data["plan"]
    # the views come from the plan's policy (replayed with get_view)
    policy = AugmentationPolicy.from_dict(p["policy"])
    dataset = CocoDetection(d["img_dir"], d["ann_file"], transforms=policy,
                            label_map=LabelMap.from_dict(d["label_map"]), strict=d["strict"],
                            validate_files=d["validate_files"], log_report=False)
    plan = ViewPlan.for_dataset(dataset, p["num_views"], p["seed"])
    if plan.fingerprint() != p["fingerprint"]:
        # e.g. the annotation file changed between the driver and this worker, or another node
        # sees other files: its views would not be the driver's
        raise CacheError(f"teacher worker rebuilt a different view plan from {d['ann_file']} "
                         f"(fingerprint {plan.fingerprint()[:12]} != {p['fingerprint'][:12]})")
    return dataset, plan


def replay_view(dataset: CocoDetection, plan: ViewPlan, index: int,
                view: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """View ``view`` of image ``index`` replayed with the plan: ``(image [3,H,W] float32, target)`` (the one
    decode + replay of both cache builds)."""
    return dataset.get_view(int(index), plan.view(int(index), int(view)))


def node_id() -> str:
    """The hex id of the Ray node this process runs on (``""`` when Ray is not initialised)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


# A killed actor is restarted (up to MAX_RESTARTS times) and the call it was running retried: its calls
# have no side effects (the driver alone writes).
TeacherActor = ray.remote(**ACTOR_OPTIONS)(TeacherWorker)
