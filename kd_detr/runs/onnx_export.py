"""ONNX export of any kd-detr detector, checked with onnxruntime.

A detector here is any ``torch.nn.Module`` called as ``model(images, mask)`` that returns a mapping with
``pred_logits [B,Q,C]`` and ``pred_boxes [B,Q,4]`` (kd-detr's Conditional DETR, and the HF-family
students that follow the same contract). The ONNX graph has

* inputs ``images`` float32 ``[B,3,H,W]`` (normalised, zero-padded bottom/right) and ``mask`` bool
  ``[B,H,W]``, True at padding (kd-detr / DETR convention; pass all False for unpadded images). A model
  whose outputs do not depend on the mask (e.g. RT-DETR) traces to a graph with ``images`` only;
* outputs ``pred_logits [B,Q,C]`` (raw class logits; apply a sigmoid) and ``pred_boxes [B,Q,4]``
  (normalised cxcywh), nothing else (no auxiliary layers);
* dynamic ``batch``, ``height`` and ``width`` axes (checked: the export is also compared at a second size).

It is traced with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, which needs
only the ``onnx`` package; the dynamo exporter would also need ``onnxscript``), opset 17. The export is
written to a temporary file beside the target and renamed onto it only after onnxruntime reproduces
the PyTorch outputs within ``atol`` (max abs difference, default 1e-4).
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

__all__ = ["ONNX_OPSET", "ONNX_TOLERANCE", "check_onnx", "export_onnx", "require_onnx_runtime"]

ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class _Predictions(nn.Module):
    """``(images, mask) -> (pred_logits, pred_boxes)``: the exported graph's signature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def _example(batch: int, height: int, width: int, device: torch.device, seed: int) -> tuple[Tensor, Tensor]:
    """Random images; the last image of a batch of more than one is padded bottom and right."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=g)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    if batch > 1:
        h, w = max(1, height * 3 // 4), max(1, width * 5 // 8)
        images[-1, :, h:, :], mask[-1, h:, :] = 0, True
        images[-1, :, :, w:], mask[-1, :, w:] = 0, True
    return images.to(device), mask.to(device)


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def require_onnx_runtime():
    """Import onnx and onnxruntime (returns onnxruntime), or raise ImportError naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxruntime packages ({e}); "
                          "pip install 'kd-detr[onnx]'") from e
    return onnxruntime


def check_onnx(path: str | os.PathLike, model: nn.Module, inputs: list[tuple[Tensor, Tensor]],
               atol: float = ONNX_TOLERANCE) -> float:
    """Run ``path`` with onnxruntime (CPU) on each ``(images, mask)`` and compare with ``model`` in eval mode.

    Returns the largest max-abs difference over both outputs and all inputs; raises ``RuntimeError`` if
    it exceeds ``atol`` or a shape differs."""
    ort = require_onnx_runtime()
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    graph_inputs = {i.name for i in session.get_inputs()}  # no "mask" when the model ignores it
    wrapper = _Predictions(model)
    was_training = model.training
    wrapper.eval()
    worst = 0.0
    try:
        for images, mask in inputs:
            with torch.no_grad():
                ref = wrapper(images, mask)
            feed = {"images": images.cpu().numpy(), "mask": mask.cpu().numpy()}
            got = session.run(list(OUTPUT_NAMES), {k: v for k, v in feed.items() if k in graph_inputs})
            for name, a, b in zip(OUTPUT_NAMES, ref, got):
                b = torch.from_numpy(b)
                if tuple(a.shape) != tuple(b.shape):
                    raise RuntimeError(f"{path}: onnxruntime {name} has shape {tuple(b.shape)}, PyTorch "
                                       f"{tuple(a.shape)} (input {tuple(images.shape)})")
                diff = float((a.detach().float().cpu() - b.float()).abs().max())
                worst = max(worst, diff)
                if not diff <= atol:
                    hint = ""
                    if tuple(images.shape) != tuple(inputs[0][0].shape):
                        hint = ("; the traced graph does not generalise to other sizes (shapes traced as "
                                "constants): export with dynamic=False and the size you will run")
                    raise RuntimeError(f"{path}: onnxruntime {name} differs from PyTorch by {diff:.3g} "
                                       f"(tolerance {atol:g}, input {tuple(images.shape)}){hint}")
    finally:
        model.train(was_training)
    return worst


def export_onnx(model: nn.Module, path: str | os.PathLike, *, height: int = 64, width: int = 64, batch: int = 2,
                opset: int = ONNX_OPSET, dynamic: bool = True, check: bool = True, atol: float = ONNX_TOLERANCE,
                metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Export ``model`` (eval mode) to ``path`` as ONNX and return the path (see the module docstring).

    ``height``/``width``/``batch``: the traced example (the last image is padded, so the mask path is
    traced). ``dynamic``: batch, height and width axes are symbolic; the check then also runs a second
    input of another batch and image size (``batch + 1``, ``height + 32``, ``width + 16``). ``metadata``:
    string key/values stored in the model's ``metadata_props`` (e.g. the label map). ``check``: compare with
    onnxruntime before the file is renamed into place. The model's training mode is restored afterwards."""
    if opset < 17:
        raise ValueError(f"opset {opset}: kd-detr exports use opset >= 17")
    require_onnx_runtime()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = _device_of(model)
    example = _example(batch, height, width, device, seed=0)
    wrapper = _Predictions(model)
    was_training = model.training
    wrapper.eval()  # the exporter restores the wrapper's mode afterwards: it must be eval already
    axes = None
    if dynamic:
        axes = {"images": {0: "batch", 2: "height", 3: "width"}, "mask": {0: "batch", 1: "height", 2: "width"},
                "pred_logits": {0: "batch"}, "pred_boxes": {0: "batch"}}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python ints/bools in shape checks
            torch.onnx.export(wrapper, example, os.fspath(tmp), dynamo=False, opset_version=opset,
                              input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes, do_constant_folding=True)
        if metadata:
            proto = onnx.load(os.fspath(tmp))
            for key, value in metadata.items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), str(value)
            onnx.save(proto, os.fspath(tmp))
        if check:
            onnx.checker.check_model(os.fspath(tmp))
            inputs = [example]
            if dynamic:
                inputs.append(_example(batch + 1, height + 32, width + 16, device, seed=1))
            check_onnx(tmp, model, inputs, atol=atol)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path
