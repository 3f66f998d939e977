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

Transformers families: DETR, Conditional DETR, DAB-DETR, Deformable DETR, RT-DETR, RT-DETRv2, D-FINE, DEIMv2,
LW-DETR and RF-DETR export (:data:`ONNX_FAMILIES`); a family kd-detr does not know yet is refused by name before
anything is written, until it is checked (:func:`check_onnx_exportable`, :data:`ONNX_REFUSED`). The top-k
families (:data:`ONNX_TOPK_FAMILIES`) need encoder scores that do not tie, which an untrained model's do.

It is traced with the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``, which needs
only the ``onnx`` package; the dynamo exporter would also need ``onnxscript``), opset 17. Four things
transformers writes would be traced wrongly, so they are replaced while tracing only (:func:`_tracing_fixes`,
undone afterwards; PyTorch's own outputs do not change):

* ``torch.as_tensor(spatial_shapes_list)`` (Deformable DETR, LW-DETR, RF-DETR) records the feature-map sizes
  as constants, so the deformable attention's offset normaliser and level start indices were the traced
  size's at every size: the ``spatial_shapes`` / ``level_start_index`` arguments are rebuilt from the traced
  sizes in ``spatial_shapes_list`` by a pre-hook on each module that takes both;
* RF-DETR's antialiased bicubic resize of its position embeddings has no ONNX operator at opset 17: it is
  computed as two matrix products with PyTorch's antialiasing cubic weights (:func:`_aa_bicubic_weights`);
* the nearest resize of the padding mask to each feature map (all mask families) becomes an ONNX Resize that
  onnxruntime rounds differently from PyTorch at some sizes (112 -> 4 rows): it is traced as gathers of the
  rows PyTorch reads (:func:`_nearest_index`);
* kd-detr's padding to whole backbone windows (LW-DETR, RF-DETR) skips the pad when the traced size needs
  none; while tracing it always pads, by a traced amount.

The export is written to a temporary file beside the target and renamed onto it only after onnxruntime
reproduces the PyTorch outputs within ``atol`` (max abs difference, default 1e-4).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from kd_detr.models.hf_export import ExportMismatch

__all__ = ["ONNX_FAMILIES", "ONNX_OPSET", "ONNX_REFUSED", "ONNX_TOPK_FAMILIES", "ExportMismatch", "ONNX_TOLERANCE", "check_onnx", "check_onnx_exportable",
           "export_onnx", "require_onnx_runtime"]

ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4
INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


# transformers families whose traced graph onnxruntime runs with the PyTorch outputs (checked at two sizes)
ONNX_FAMILIES = frozenset({"detr", "conditional_detr", "dab_detr", "deformable_detr", "rt_detr", "rt_detr_v2",
                           "d_fine", "deimv2", "lw_detr", "rf_detr"})
# of these, the ones whose encoder picks the decoder's queries by top-k over encoder tokens in which transformers'
# init leaves every score equal (or within float32 rounding, ~1e-6, of each other): onnxruntime orders such ties
# differently from PyTorch, so such a model (an untrained one) fails the check; a model whose scores are apart
# (trained, or given a variance-preserving init: D-FINE and DEIMv2 then match within 2e-6) exports
ONNX_TOPK_FAMILIES = frozenset({"rt_detr", "rt_detr_v2", "d_fine", "deimv2"})
# families refused by name, with why (empty: every family kd-detr registers exports)
ONNX_REFUSED: dict[str, str] = {}


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


def _size(v) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(v)


def _traced_spatial_shapes(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: ``spatial_shapes [L,2]`` (and ``level_start_index [L]``) rebuilt from the sizes in
    ``spatial_shapes_list``, which the tracer follows, instead of the ``torch.as_tensor`` constant."""
    shapes = kwargs.get("spatial_shapes_list")
    if not shapes or kwargs.get("spatial_shapes") is None:
        return None
    spatial = torch.stack([torch.stack([_size(h), _size(w)]).to(torch.long) for h, w in shapes])
    kwargs = dict(kwargs, spatial_shapes=spatial)
    if kwargs.get("level_start_index") is not None:
        kwargs["level_start_index"] = torch.cat((spatial.new_zeros((1,)), spatial.prod(1).cumsum(0)[:-1]))
    return args, kwargs


def _aa_bicubic_weights(out_size, in_size: int, dtype: torch.dtype) -> Tensor:
    """``[out_size, in_size]`` weights of PyTorch's antialiased bicubic resize along one axis
    (``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``: Keys cubic with a = -0.5, widened by
    the scale when shrinking, normalised to sum 1). ``out_size`` may be a traced size."""
    out = _size(out_size)
    scale = in_size / out.to(torch.float32)
    stretch = torch.clamp(scale, min=1.0)  # the kernel widens only when shrinking
    centre = scale * (torch.arange(out, dtype=torch.float32) + 0.5)
    x = ((torch.arange(in_size, dtype=torch.float32)[None, :] + 0.5 - centre[:, None]) / stretch).abs()
    a = -0.5
    w = torch.where(x < 1.0, ((a + 2) * x - (a + 3)) * x * x + 1,
                    torch.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    return (w / w.sum(1, keepdim=True)).to(dtype)


def _nearest_index(out_size, in_size) -> Tensor:
    """``[out_size]`` source rows of PyTorch's nearest resize, ``floor(i * (in / out))`` in float32 as PyTorch
    computes it (onnxruntime divides by ``out / in`` instead, which lands one row early where ``in / out`` is a
    whole number: a mask resized from 112 to 4 rows read row 55, not 56)."""
    scale = _size(in_size).to(torch.float32) / _size(out_size).to(torch.float32)
    index = torch.floor(torch.arange(_size(out_size), dtype=torch.float32) * scale).to(torch.long)
    return torch.minimum(index, _size(in_size) - 1)


class _TracedInterpolate(TorchFunctionMode):
    """Two ``F.interpolate`` calls on ``x [B,C,h,w]`` to ``size=(H, W)``, traced as ONNX ops that reproduce
    PyTorch: ``mode="bicubic", antialias=True`` (no opset-17 operator) as ``Wy [H,h] @ x @ Wx [W,w]^T``, and
    ``mode="nearest"`` (the padding masks of the DETR families) as row / column gathers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.interpolate:
            params = dict(zip(("input", "size", "scale_factor", "mode", "align_corners"), args), **kwargs)
            x, size, mode = params["input"], params.get("size"), params.get("mode", "nearest")
            if size is not None and x.dim() == 4 and not isinstance(size, (int, Tensor)):
                height, width = size
                if mode == "bicubic" and params.get("antialias") and not params.get("align_corners"):
                    wy = _aa_bicubic_weights(height, x.shape[-2], x.dtype)
                    wx = _aa_bicubic_weights(width, x.shape[-1], x.dtype)
                    return torch.einsum("Hh,bchw,Ww->bcHW", wy, x, wx)
                if mode == "nearest":
                    rows = _nearest_index(height, x.shape[-2])
                    return x.index_select(-2, rows).index_select(-1, _nearest_index(width, x.shape[-1]))
        return func(*args, **kwargs)


def _traced_pad_to_multiple(x: Tensor, mask: Optional[Tensor], m: int) -> tuple[Tensor, Optional[Tensor]]:
    """The adapter's padding to whole windows, always padding (by a traced, possibly zero, amount): the
    adapter skips the pad when the size needs none, which a trace would record for every size."""
    height, width = x.shape[-2:]
    ph, pw = -height % m, -width % m
    if mask is None:
        mask = torch.zeros(x.shape[0], height, width, dtype=torch.bool, device=x.device)
    return F.pad(x, (0, pw, 0, ph)), F.pad(mask, (0, pw, 0, ph), value=True)


@contextlib.contextmanager
def _tracing_fixes(model: nn.Module) -> Iterator[None]:
    """While ``torch.onnx.export`` traces ``model``: the replacements listed in the module docstring; all undone
    on exit."""
    hooks = []
    for module in model.modules():
        params = inspect.signature(module.forward).parameters
        if "spatial_shapes" in params and "spatial_shapes_list" in params:
            hooks.append(module.register_forward_pre_hook(_traced_spatial_shapes, with_kwargs=True))
    # only a transformers-family model can need it (and then its adapter is loaded already)
    adapter = sys.modules.get("kd_detr.models.hf.adapter")
    pad = getattr(adapter, "_pad_to_multiple", None)
    if pad is not None:
        adapter._pad_to_multiple = _traced_pad_to_multiple
    try:
        with _TracedInterpolate():
            yield
    finally:
        for h in hooks:
            h.remove()
        if pad is not None:
            adapter._pad_to_multiple = pad


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
            try:
                got = session.run(list(OUTPUT_NAMES), {k: v for k, v in feed.items() if k in graph_inputs})
            except Exception as e:  # onnxruntime's own errors (e.g. a Reshape to a size traced as a constant)
                raise ExportMismatch(f"{path}: onnxruntime cannot run the graph on input {tuple(images.shape)}: "
                                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
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
                        hint = ("; its top-k query selection meets tied encoder scores (an untrained model's), "
                                "which onnxruntime orders differently: export a trained model")
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
            with _tracing_fixes(model):
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
