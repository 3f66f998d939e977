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

Transformers families: DETR, Conditional DETR, DAB-DETR, RT-DETR and RT-DETRv2 export; the others are refused before anything is
written, by name and with the reason (:func:`check_onnx_exportable`, :data:`ONNX_REFUSED`): their graphs do not
reproduce PyTorch in onnxruntime. A family kd-detr does not know yet is refused until it is checked.

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

from kd_detr.models.hf_export import ExportMismatch

__all__ = ["ONNX_FAMILIES", "ONNX_OPSET", "ONNX_REFUSED", "ONNX_TOPK_FAMILIES", "ExportMismatch", "ONNX_TOLERANCE", "check_onnx", "check_onnx_exportable",
           "export_onnx", "require_onnx_runtime"]

ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


# transformers families whose traced graph onnxruntime runs with the PyTorch outputs (checked at two sizes)
ONNX_FAMILIES = frozenset({"detr", "conditional_detr", "dab_detr", "rt_detr", "rt_detr_v2"})
# of these, the ones whose encoder picks the decoder's queries by top-k over encoder tokens: masked anchors share
# one score, and onnxruntime orders such ties differently from PyTorch, so a model whose top-k reaches them
# (an untrained one) fails the check; a trained model's scores do not tie
ONNX_TOPK_FAMILIES = frozenset({"rt_detr", "rt_detr_v2"})
# why the others are refused (found by exporting the tiny models and comparing in onnxruntime)
ONNX_REFUSED: dict[str, str] = {
    "deformable_detr": "its multi-scale deformable attention is traced with the feature-map sizes as constants, so "
                       "the graph is wrong at any other image size (and a fixed-size graph needs a GridSample "
                       "onnxruntime lacks)",
    "d_fine": "onnxruntime's outputs differ from PyTorch's by up to 1e-3 of the logits' scale (its box "
              "distribution refinement), beyond the 1e-4 check",
    "deimv2": "onnxruntime's outputs differ from PyTorch's by up to 2e-3 of the logits' scale (D-FINE's box "
              "distribution refinement), beyond the 1e-4 check",
    "lw_detr": "its ViT backbone is traced with the patch grid as constants (the graph holds only at the traced "
               "image size)",
    "rf_detr": "its backbone resizes with antialiased bicubic interpolation, which ONNX opset 17 has no operator for",
}


def check_onnx_exportable(config) -> None:
    """Raise ``ValueError`` (one line, naming the family and why) if the model of ``config`` (a kd-detr
    ``ModelConfig`` or an ``HFModelConfig``) has no faithful ONNX export."""
    family = getattr(config, "family", None)
    if family is None or family in ONNX_FAMILIES:
        return
    why = ONNX_REFUSED.get(family, "kd-detr has not checked this family's ONNX graph against PyTorch")
    raise ValueError(f"cannot export {config.name} to ONNX: transformers family {family!r}: {why}; "
                     f"ONNX export supports kd-detr's Conditional DETR and the families {sorted(ONNX_FAMILIES)}")


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

    Returns the largest max-abs difference over both outputs and all inputs; raises :class:`ExportMismatch`
    (a ``ValueError``) if it exceeds ``atol`` or a shape differs."""
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
                    raise ExportMismatch(f"{path}: onnxruntime {name} has shape {tuple(b.shape)}, PyTorch "
                                       f"{tuple(a.shape)} (input {tuple(images.shape)})")
                diff = float((a.detach().float().cpu() - b.float()).abs().max())
                worst = max(worst, diff)
                if not diff <= atol:
                    hint = ""
                    family = getattr(getattr(model, "config", None), "family", None)
                    if family in ONNX_TOPK_FAMILIES:
                        hint = ("; its top-k query selection meets tied encoder scores (an untrained model's "
                                "masked anchors), which onnxruntime orders differently: export a trained model")
                    elif tuple(images.shape) != tuple(inputs[0][0].shape):
                        hint = ("; the traced graph does not generalise to other sizes (shapes traced as "
                                "constants): export with dynamic=False and the size you will run")
                    raise ExportMismatch(f"{path}: onnxruntime {name} differs from PyTorch by {diff:.3g} "
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
    if getattr(model, "config", None) is not None:
        check_onnx_exportable(model.config)
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
            try:
                check_onnx(tmp, model, inputs, atol=atol)
            except ExportMismatch as e:  # name the file asked for, not the temporary one
                raise ExportMismatch(str(e).replace(os.fspath(tmp), os.fspath(path))) from None
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path
