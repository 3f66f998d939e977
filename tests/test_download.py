"""Weights that download themselves (kd_detr/download.py), against a small HTTP server on 127.0.0.1: a served
file, a wrong hash, a dropped connection, a 404, offline; a teacher card's checkpoint and an ImageNet backbone
fetched into KD_DETR_HOME."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from kd_detr.download import DownloadError, cached_file, download, imagenet_backbone, kd_detr_home

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        self.hits.append(self.path)
        if self.path.startswith("/drop/"):  # says 1 MiB, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        body = self.files.get(self.path.split("/")[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KD_DETR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KD_DETR_OFFLINE", raising=False)
    _Handler.files = {"weights.pth": PAYLOAD}
    _Handler.hits.clear()
    return tmp_path / "home"


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_a_served_file_is_downloaded_once_checked_and_kept(server, home):
    url = f"{server}/files/weights.pth"
    dest = cached_file("teachers", url)
    assert dest == home / "teachers" / "weights.pth" and kd_detr_home() == home
    assert download(url, dest, SHA, progress=False).read_bytes() == PAYLOAD
    assert download(url, dest, SHA, progress=False) == dest  # second use: from the cache, no request
    assert _Handler.hits == ["/files/weights.pth"] and _leftovers(home) == [dest]
    # a torchvision-style name carries the hash prefix it is checked against
    _Handler.files["resnet-" + SHA[:8] + ".pth"] = PAYLOAD
    named = f"{server}/resnet-{SHA[:8]}.pth"
    assert download(named, cached_file("backbones", named), progress=False).is_file()


def test_a_wrong_hash_keeps_nothing(server, home):
    url = f"{server}/files/weights.pth"
    with pytest.raises(DownloadError, match="not the recorded 0000") as e:
        download(url, cached_file("teachers", url), "0" * 64, progress=False)
    assert SHA in str(e.value) and _leftovers(home) == []
    bad_name = f"{server}/resnet-deadbeef.pth"
    _Handler.files["resnet-deadbeef.pth"] = PAYLOAD
    with pytest.raises(DownloadError, match="deadbeef"):
        download(bad_name, cached_file("backbones", bad_name), progress=False)
    assert _leftovers(home) == []


def test_a_dropped_connection_and_a_404_leave_nothing_that_looks_complete(server, home):
    url = f"{server}/drop/weights.pth"
    with pytest.raises(DownloadError) as e:
        download(url, cached_file("teachers", url), SHA, progress=False)
    assert url in str(e.value) and "\n" not in str(e.value) and _leftovers(home) == []
    missing = f"{server}/files/absent.pth"
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        download(missing, cached_file("teachers", missing), progress=False)
    assert str(home / "teachers" / "absent.pth") in str(e.value) and _leftovers(home) == []


def test_offline_is_one_line_naming_the_url_and_the_path(server, home, monkeypatch):
    monkeypatch.setenv("KD_DETR_OFFLINE", "1")
    url = f"{server}/files/weights.pth"
    with pytest.raises(DownloadError) as e:
        download(url, cached_file("teachers", url), SHA, progress=False)
    msg = str(e.value)
    assert url in msg and str(home / "teachers" / "weights.pth") in msg and "\n" not in msg
    assert _Handler.hits == []


def test_a_teacher_card_fetches_its_checkpoint_into_the_user_cache(server, home, tmp_path, synth_data):
    """A card whose checkpoint is not beside it (a wheel install) downloads it from its url, checks its sha256,
    and a distillation run uses it; the package folder is never written."""
    from click.testing import CliRunner

    from kd_detr.cli import main
    from tests.support.runs import distill_args, save_teacher

    import json

    weights = save_teacher(tmp_path, synth_data).read_bytes()
    classes = len(json.loads((synth_data / "annotations" / "instances_train2017.json").read_text())["categories"])
    _Handler.files["teacher.safetensors"] = weights
    card = tmp_path / "cards" / "served.toml"
    card.parent.mkdir()
    card.write_text(f'model = "cond_detr_r10_tiny"\ncheckpoint = "checkpoints/teacher.safetensors"\n'
                    f'url = "{server}/files/teacher.safetensors"\n'
                    f'sha256 = "{hashlib.sha256(weights).hexdigest()}"\nnum_classes = {classes}\nlabel_map = "contiguous"\n'
                    f'image_size = 64\n[model_overrides]\nnum_queries = 10\ndim_feedforward = 128\n')
    args = distill_args(synth_data, tmp_path / "run", "x", "--set", "train.max_iters=1")
    args[args.index("--teacher") + 1: args.index("--teacher") + 4] = [str(card)]  # the card, no checkpoint option
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (home / "teachers" / "teacher.safetensors").read_bytes() == weights
    assert not (card.parent / "checkpoints").exists()
    assert _Handler.hits == ["/files/teacher.safetensors"]


def test_the_imagenet_backbone_is_torchvisions_and_checked(server, home, monkeypatch):
    """``--backbone-weights imagenet``: torchvision's IMAGENET1K_V1 URL (served here under its own file name),
    into KD_DETR_HOME/backbones, loaded into a ResNet-50 backbone."""
    import torch
    import torchvision

    from kd_detr.models import build_model

    url = torchvision.models.get_model_weights("resnet50").IMAGENET1K_V1.url
    name = url.rsplit("/", 1)[1]
    assert name.startswith("resnet50-")
    state = torchvision.models.resnet50().state_dict()
    buf = home.parent / "r50.pth"
    torch.save(state, buf)
    body = buf.read_bytes()
    prefix = hashlib.sha256(body).hexdigest()[:8]
    served = f"resnet50-{prefix}.pth"
    _Handler.files[served] = body

    class Weights:  # torchvision's enum, pointed at the local server
        IMAGENET1K_V1 = type("W", (), {"url": f"{server}/models/{served}"})()

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda arch: Weights)
    model = build_model("cond_detr_r50", num_classes=3, backbone_weights="imagenet")
    assert (home / "backbones" / served).is_file()
    assert torch.equal(model.backbone.body.state_dict()["conv1.weight"], state["conv1.weight"])
    monkeypatch.undo()
    with pytest.raises(DownloadError, match="resnet10"):
        imagenet_backbone("resnet10")


def test_offline_option_names_the_url_and_the_path_in_one_line(server, home, tmp_path, synth_data, monkeypatch):
    from click.testing import CliRunner

    from kd_detr.cli import main
    from tests.support.runs import distill_args

    monkeypatch.setenv("KD_DETR_OFFLINE", "")  # restored (removed) after the test, whatever --offline sets
    card = tmp_path / "served.toml"
    card.write_text(f'model = "cond_detr_r10_tiny"\ncheckpoint = "absent.safetensors"\n'
                    f'url = "{server}/files/teacher.safetensors"\nnum_classes = 3\nlabel_map = "contiguous"\n')
    args = distill_args(synth_data, tmp_path / "run", "x", "--set", "train.max_iters=1")
    args[args.index("--teacher") + 1: args.index("--teacher") + 4] = [str(card)]
    res = CliRunner().invoke(main, ["--offline", *args])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert f"{server}/files/teacher.safetensors" in line and str(home / "teachers" / "teacher.safetensors") in line
    assert "--offline" in line and _Handler.hits == []
