"""Audit findings: (1) annotation ids numbered from 0 silently lowered AP (pycocotools never matches a ground
truth whose id is 0); (2) a Ray address where something that is not Ray accepts TCP made ``ray.init`` retry for
minutes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from kd_detr.evaluation import eval_ground_truth, evaluate_results

# ------------------------------------------------------------------------------- 1. annotation id 0

IMAGES = [{"id": 1, "file_name": "a.png", "width": 200, "height": 200},
          {"id": 2, "file_name": "b.png", "width": 200, "height": 200}]
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
# (image_id, category_id, [x, y, w, h]): small, medium and large boxes
BOXES = [(1, 1, [10.0, 10.0, 20.0, 15.0]), (1, 2, [60.0, 50.0, 60.0, 50.0]), (1, 1, [20.0, 100.0, 150.0, 90.0]),
         (2, 2, [5.0, 5.0, 25.0, 20.0]), (2, 1, [100.0, 100.0, 80.0, 70.0])]


def _gt_dict(first_id: int, images=IMAGES, categories=CATEGORIES, boxes=BOXES) -> dict:
    anns = [{"id": first_id + i, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for i, (im, c, b) in enumerate(boxes)]
    return {"images": copy.deepcopy(images), "annotations": anns, "categories": copy.deepcopy(categories)}


def _coco(data: dict) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(data)
        coco.createIndex()
    return coco


def _perfect(boxes=BOXES) -> list[dict]:
    return [{"image_id": im, "category_id": c, "bbox": list(b), "score": 0.9} for im, c, b in boxes]


def _imperfect() -> list[dict]:
    """Shifted boxes, a wrong class, a duplicate and a false positive at varied scores: AP strictly in (0, 1)."""
    dets = []
    for k, (im, c, b) in enumerate(BOXES):
        x, y, w, h = b
        dets.append({"image_id": im, "category_id": c, "bbox": [x + 0.08 * k * w, y, w, h], "score": 0.9 - 0.1 * k})
    dets.append({"image_id": 1, "category_id": 2, "bbox": [10.0, 10.0, 20.0, 15.0], "score": 0.95})  # wrong class
    dets.append({"image_id": 2, "category_id": 1, "bbox": [101.0, 99.0, 80.0, 70.0], "score": 0.3})  # duplicate
    dets.append({"image_id": 2, "category_id": 2, "bbox": [150.0, 10.0, 30.0, 30.0], "score": 0.85})  # nothing there
    return dets


def _raw_pycocotools(data: dict, dets: list[dict]) -> list[float]:
    gt = _coco(data)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes([dict(d) for d in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


def test_annotation_ids_from_zero_score_perfect_detections_at_ap_one(caplog):
    data = _gt_dict(0)
    # the finding: plain pycocotools loses the ground truth with id 0
    raw = _raw_pycocotools(data, _perfect())
    assert raw[0] < 0.99 and raw[8] == pytest.approx((2 / 3 + 1) / 2)  # AR100: 1 of the 3 cats missed
    gt = _coco(data)
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        first = evaluate_results(gt, _perfect())
        second = evaluate_results(gt, _perfect())
    for res in (first, second):
        assert res.stats[0] == pytest.approx(1.0) and res.metrics["AR100"] == pytest.approx(1.0)
        assert [c["AP"] for c in res.per_class] == [pytest.approx(1.0), pytest.approx(1.0)]
    said = [r.getMessage() for r in caplog.records if "renumbered" in r.getMessage()]
    assert len(said) == 1, said  # said once per ground truth, not at every evaluation
    assert "1 annotation id(s) of the ground truth are not positive integers (first: 0)" in said[0]
    assert "renumbered 1..5 in file order" in said[0] and "\n" not in said[0]
    # the caller's COCO keeps its ids
    assert [a["id"] for a in gt.dataset["annotations"]] == [0, 1, 2, 3, 4] and sorted(gt.anns) == [0, 1, 2, 3, 4]


def test_renumbered_ids_score_exactly_as_ids_from_one():
    dets = _imperfect()
    one_based = _gt_dict(1)
    reference = _raw_pycocotools(one_based, dets)
    assert 0.05 < reference[0] < 0.95  # the detections are really imperfect
    gt1 = _coco(one_based)
    assert eval_ground_truth(gt1) is gt1  # valid ids: no copy
    res1 = evaluate_results(gt1, dets)
    assert res1.stats == reference
    for first_id in (0, -2):  # from 0, and negative ids around 0
        res0 = evaluate_results(_coco(_gt_dict(first_id)), dets)
        assert res0.stats == reference and res0.per_class == res1.per_class
        assert res0.summary_text == res1.summary_text


def test_image_and_category_id_zero_need_no_renumbering(caplog):
    images = [dict(IMAGES[0], id=0), IMAGES[1]]
    categories = [{"id": 0, "name": "cat"}, {"id": 2, "name": "dog"}]
    boxes = [(0 if im == 1 else im, 0 if c == 1 else c, b) for im, c, b in BOXES]
    data = _gt_dict(1, images, categories, boxes)
    assert _raw_pycocotools(data, _perfect(boxes))[0] == pytest.approx(1.0)  # pycocotools handles id 0 there
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        res = evaluate_results(_coco(data), _perfect(boxes))
    assert res.stats[0] == pytest.approx(1.0) and res.num_images == 2
    assert not [r for r in caplog.records if "renumbered" in r.getMessage()]


def test_dataset_with_ids_from_zero_names_its_file_and_leaves_it_untouched(synth_data, tmp_path, caplog):
    from kd_detr.data import CocoDetection

    src = json.loads((synth_data / "annotations" / "instances_val2017.json").read_text())
    for i, a in enumerate(src["annotations"]):
        a["id"] = i  # numbered from 0, as many converters do
    ann = tmp_path / "val0.json"
    ann.write_text(json.dumps(src))
    before = ann.read_bytes()
    ds = CocoDetection(synth_data / "val2017", ann, log_report=False)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in src["annotations"]]
    with caplog.at_level(logging.WARNING, logger="kd_detr.evaluation"):
        res = evaluate_results(ds.coco, perfect)
    assert res.stats[0] == pytest.approx(1.0) and res.metrics["AR100"] == pytest.approx(1.0)
    said = [r.getMessage() for r in caplog.records if "renumbered" in r.getMessage()]
    assert len(said) == 1 and f"of {ann} are not positive integers (first: 0)" in said[0]
    assert ann.read_bytes() == before


# ------------------------------------------------------------------------- 2. a port that is not Ray

from kd_detr.teacher import ray_session as rsession  # noqa: E402

MARK = f"KD_DETR_AUDIT_RAY_TEST={os.getpid()}"  # inherited by anything the join subprocess would start


class _FakeServer:
    """A TCP server on every interface (Ray dials this machine's IP for 127.0.0.1) that accepts and then says
    nothing (``reply=None``: a frozen head) or answers ``reply`` (a service that is not Ray)."""

    def __init__(self, reply: bytes | None = None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)  # the serving thread checks `stopped` between waits
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns, self.stopped = reply, [], False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(self.reply)

    def close(self):
        self.stopped = True
        self.thread.join(timeout=5)
        for c in [*self.conns, self.sock]:
            with contextlib.suppress(OSError):
                c.close()


@contextlib.contextmanager
def _fake_server(reply: bytes | None = None):
    srv = _FakeServer(reply)
    try:
        yield srv
    finally:
        srv.close()


def _ray_processes_with_mark() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if MARK.encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmd or "gcs_server" in cmd:
            out.append(cmd)
    return out


@pytest.mark.slow  # a fresh interpreter imports torch and Ray (~6-15 s on the 2-core machine)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_join_where_a_non_ray_server_listens_fails_in_bounded_time_with_one_line():
    """The finding: the TCP probe passed and ``ray.init`` retried for minutes. Now the join gives up after
    ``$KD_DETR_RAY_CONNECT_TIMEOUT`` (3 s here), names the address and its origin, and starts no Ray. It runs
    in a fresh process, so a failed join can touch no Ray session of the other tests."""
    script = textwrap.dedent("""
        import time, ray
        from kd_detr.teacher.ray_session import ensure_ray
        t0 = time.monotonic()
        try:
            ensure_ray()
            print("JOINED")
        except ValueError as e:
            print(f"{time.monotonic() - t0:.2f}|{ray.is_initialized()}|{e}")
    """)
    with _fake_server() as silent:
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{silent.port}", "KD_DETR_RAY_CONNECT_TIMEOUT": "3",
               MARK.split("=")[0]: MARK.split("=")[1]}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    seconds, initialised, msg = out.stdout.strip().split("|", 2)
    assert 2.9 <= float(seconds) < 8 and initialised == "False"  # bounded by the 3 s, not minutes
    assert msg.startswith(f"no Ray cluster answered at 127.0.0.1:{silent.port} (from $RAY_ADDRESS")
    assert "within 3 s" in msg and "$KD_DETR_RAY_CONNECT_TIMEOUT=SECONDS waits longer" in msg
    assert "unset RAY_ADDRESS" in msg and "token" not in msg.lower() and "\n" not in msg
    assert not _ray_processes_with_mark()


def test_join_at_a_silent_or_a_non_ray_server_never_reaches_ray_init(no_ray_init, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, "1")
    with _fake_server() as silent, _fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as garbage:
        t0 = time.monotonic()
        with pytest.raises(ValueError) as e1:
            rsession.ensure_ray(f"127.0.0.1:{silent.port}")
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(ValueError) as e2:
            rsession.ensure_ray(f"127.0.0.1:{garbage.port}")
        assert time.monotonic() - t0 < 5
    m1, m2 = str(e1.value), str(e2.value)
    assert m1.startswith(f"no Ray cluster answered at 127.0.0.1:{silent.port} (from --address") and "within 1 s" in m1
    assert "leave out --address" in m1
    assert m2.startswith(f"no Ray cluster at 127.0.0.1:{garbage.port} (from --address") and "not a Ray GCS" in m2
    for m in (m1, m2):
        assert "token" not in m.lower() and "\n" not in m


def test_connect_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv(rsession.CONNECT_TIMEOUT_ENV, raising=False)
    assert rsession.connect_timeout() == 30.0
    monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, "2.5")
    assert rsession.connect_timeout() == 2.5
    for bad in ("soon", "0", "-1", "inf"):
        monkeypatch.setenv(rsession.CONNECT_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=rf"^\$KD_DETR_RAY_CONNECT_TIMEOUT='{bad}' is not a number of seconds"):
            rsession.connect_timeout()


def test_only_a_refused_token_suggests_token_authentication():
    """A gRPC server that refuses every call as unauthenticated (what a Ray GCS answers a client without the
    cluster's token): the message says so; a failed ray.init after the GCS answered does not blame tokens."""
    grpc = pytest.importorskip("grpc")
    from concurrent.futures import ThreadPoolExecutor

    class Refuse(grpc.GenericRpcHandler):
        def service(self, details):
            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: token missing or incorrect")
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(ThreadPoolExecutor(max_workers=1), handlers=[Refuse()])
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    try:
        with pytest.raises(ValueError) as e:
            rsession.check_ray_answers(f"127.0.0.1:{port}", source="$RAY_ADDRESS", timeout=5)
    finally:
        server.stop(None)
    msg = str(e.value)
    assert msg.startswith(f"the Ray cluster at 127.0.0.1:{port} (from $RAY_ADDRESS")
    assert "InvalidAuthToken" in msg and "RAY_AUTH_MODE=token" in msg


@pytest.mark.parametrize("ray_error, token_hint", [
    ("Failed to connect to Ray cluster at 10.0.0.1:6379", False),
    ("Unauthenticated: RPC error: InvalidAuthToken", True),
])
def test_failed_ray_init_blames_tokens_only_when_ray_says_so(monkeypatch, ray_error, token_hint):
    monkeypatch.setattr(rsession.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(rsession, "check_ray_reachable", lambda *a, **k: None)
    monkeypatch.setattr(rsession, "check_ray_answers", lambda *a, **k: None)

    def init(**kwargs):
        raise ConnectionError(ray_error)

    monkeypatch.setattr(rsession.ray, "init", init)
    with pytest.raises(ValueError) as e:
        rsession.ensure_ray("10.0.0.1:6379")
    msg = str(e.value)
    assert msg.startswith(f"cannot join the Ray cluster at 10.0.0.1:6379 (from --address): {ray_error}: ")
    assert ("RAY_AUTH_MODE=token" in msg) is token_hint


def test_a_live_ray_cluster_passes_the_probe(ray_session):
    """The probe must not refuse a real cluster (the shared local Ray of the tests, with its token)."""
    address = ray_session.get_runtime_context().gcs_address
    t0 = time.monotonic()
    rsession.check_ray_answers(address, timeout=10)
    assert time.monotonic() - t0 < 5
