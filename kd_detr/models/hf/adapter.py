"""A transformers DETR-family model as a kd-detr detector: :class:`HFDetector`.

The adapter runs the family's own ``*ForObjectDetection.forward`` unchanged (its outputs, its loss, its
denoising) and reads what the detector contract needs around it:

* every decoder layer's logits and boxes (``[L,B,Q,C]``, ``[L,B,Q,4]``), read the family's way
  (:mod:`.families`), with denoising and training-only queries cut off so that the methods see only the
  queries that exist at inference;
* class logits in one semantics for every family: per-class sigmoid logits. A softmax family (DETR: ``C``
  classes plus no-object) gives ``logit(softmax(z)[:C])``, so that ``sigmoid`` of what the methods see is
  the family's own class probability and KD terms compare like with like across families; its raw logits
  stay in ``family_logits``;
* the family's image policy on the view kd-detr's data pipeline made (ImageNet-normalised, padded, with a
  mask): mask families (DETR, Conditional/DAB/Deformable DETR) take the padded batch and its pixel mask as
  is; fixed-size families (RT-DETR, D-FINE, ...) get each image's own region resized to
  ``input_size x input_size`` (boxes are relative to the image, so they do not change), in ``[0, 1]``
  without mean/std where the family has none;
* with ``targets`` in training, the family's own training loss (``family_losses``, one term per key of its
  ``loss_dict``), computed by transformers in the same forward (its matcher, focal/VFL terms, denoising).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detector import DetectorOutput, DetectorRequest
from .config import HFModelConfig
from .families import Family, get_family

__all__ = ["HFDetector", "build_transformers_model", "check_loading", "hub_offline_and_quiet", "transformers_labels"]

log = logging.getLogger("kd_detr.models.hf")

_MEAN = (0.485, 0.456, 0.406)  # kd-detr's data pipeline normalises with ImageNet mean/std
_STD = (0.229, 0.224, 0.225)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the extra is installed in tests
        raise ImportError("Hugging Face detectors need transformers: pip install \"kd-detr[hf]\"") from e
    return transformers


ROLES = ("student", "teacher")
_WARNED_AUTO_MAP: set[str] = set()  # folders whose auto_map was warned about (once per process)


@contextlib.contextmanager
def hub_offline_and_quiet():
    """For the duration: the Hugging Face Hub off (``HF_HUB_OFFLINE=1`` and huggingface_hub's own switch, which
    it read at import), transformers' logging at ERROR (its load-report tables) and its progress bars off (the
    "Loading weights" bar). Everything is restored afterwards, whatever it was."""
    _transformers()
    import huggingface_hub.constants as hub_constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_offline = hub_constants.HF_HUB_OFFLINE
    old_verbosity = hf_logging.get_verbosity()
    old_bars = hf_logging.is_progress_bar_enabled()
    old_hub_bars_off = are_progress_bars_disabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        hub_constants.HF_HUB_OFFLINE = old_offline
        hf_logging.set_verbosity(old_verbosity)
        if old_bars:
            hf_logging.enable_progress_bar()  # also turns huggingface_hub's bars on: set back below
        if old_hub_bars_off:
            disable_progress_bars()


def _offline_config(hf: Any) -> Any:
    """A copy of the transformers config dict with every ``use_pretrained_backbone`` off: the folder's own
    tensors initialise the backbone, and a pretrained timm backbone would be downloaded first."""
    if isinstance(hf, dict):
        return {k: (False if k == "use_pretrained_backbone" else _offline_config(v)) for k, v in hf.items()}
    if isinstance(hf, list):
        return [_offline_config(v) for v in hf]
    return hf


def _warn_auto_map(config: HFModelConfig, hf_class: str) -> None:
    auto_map = config.hf_config.get("auto_map")
    if not auto_map or str(config.source) in _WARNED_AUTO_MAP:
        return
    _WARNED_AUTO_MAP.add(str(config.source))
    if isinstance(auto_map, dict):
        custom = auto_map.get("AutoModelForObjectDetection") or next(
            (v for k, v in auto_map.items() if k != "AutoConfig"), None) or next(iter(auto_map.values()), None)
    else:
        custom = auto_map
    if isinstance(custom, (list, tuple)):
        custom = next((c for c in custom if c), custom)
    log.warning("%s: config.json's auto_map names custom code (%s), which kd-detr never runs: transformers' "
                "built-in %s (model_type %r) is used instead", config.name, custom, hf_class,
                config.hf_config.get("model_type"))


def build_transformers_model(config: HFModelConfig, role: str = "student", load_weights: bool = True) -> nn.Module:
    """The transformers model of ``config``: the folder's weights (``config.source``, local files only, the Hub
    off) or a random initialisation (no ``source``, or ``load_weights=False`` when a kd-detr checkpoint's
    tensors replace them next).

    Every load is checked (:func:`check_loading`): a ``teacher`` loads every tensor of the folder with its shape
    or is refused; a ``student`` may re-initialise its class head when its class count differs from the
    folder's (one logged line). ``config.allow_partial_weights`` lets anything else through with a warning
    naming what starts from random values. A broken folder is one ``ValueError`` naming the file."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    transformers = _transformers()
    family = get_family(config.family)
    cls = getattr(transformers, family.hf_class)
    _warn_auto_map(config, family.hf_class)
    attn = "eager" if family.dense_attention else None  # attention weights come only from the eager path
    kwargs = {"attn_implementation": attn} if attn else {}
    where = config.source if (config.source and load_weights) else config.name
    with hub_offline_and_quiet():
        try:
            hf_config = cls.config_class.from_dict(_offline_config(dict(config.hf_config)))
        except Exception as e:  # noqa: BLE001 - transformers raises many types; one line naming the config
            raise ValueError(f"{where}: transformers cannot build a {cls.config_class.__name__} from its config: "
                             f"{_one_line(e)}") from None
        if not (config.source and load_weights):
            if attn:
                hf_config._attn_implementation = attn
            return cls(hf_config)
        folder = Path(config.source)
        try:
            model, info = cls.from_pretrained(str(folder), config=hf_config, local_files_only=True,
                                              ignore_mismatched_sizes=True, output_loading_info=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - one line naming the folder's weight file
            raise _load_error(folder, e) from None
    check_loading(config, info, role)
    return model


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    hub = re.search(r"Cannot reach (\S+): offline mode is enabled", text)
    if hub:  # huggingface_hub's advice (unset HF_HUB_OFFLINE) does not apply: kd-detr turned the Hub off
        return (f"it asks for {hub.group(1).rstrip(':')} from the Hugging Face Hub, and kd-detr builds transformers "
                "models from local files only (name a local backbone_config instead)")
    return text[:300] + (" ..." if len(text) > 300 else "")


def _load_error(folder: Path, e: BaseException) -> ValueError:
    from ..backbone import weights_load_error
    from .registry import weight_files

    files = weight_files(folder)
    # transformers reads model.safetensors before pytorch_model.bin; name the one it read
    target = next((f for f in files if f.suffix == ".safetensors"), files[0] if files else folder)
    if "GLOBAL" in str(e) or "weights_only" in str(e) or "Weights only" in str(e):
        target = next((f for f in files if f.suffix == ".bin"), target)
    err = weights_load_error(target, e)
    if str(err).startswith("cannot read weights file"):
        return ValueError(f"{folder}: transformers could not load the model from {target.name}: "
                          f"{type(e).__name__}: {_one_line(e)}")
    return err


def _class_head_change(file_shape: tuple, model_shape: tuple, old: int, new: int) -> bool:
    """Whether a tensor differs from the folder's only in its class dimension: one axis of size ``old + k`` in
    the file and ``new + k`` in the model, ``k`` 0 (class logits) or 1 (DETR's no-object slot, RT-DETR's
    denoising label embedding with its padding class)."""
    if len(file_shape) != len(model_shape):
        return False
    diff = [i for i, (a, b) in enumerate(zip(file_shape, model_shape)) if a != b]
    return len(diff) == 1 and file_shape[diff[0]] - old == model_shape[diff[0]] - new in (0, 1)


def _listed(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_loading(config: HFModelConfig, info: dict[str, Any], role: str) -> None:
    """Refuse a load that left tensors out (``info``: ``from_pretrained(..., output_loading_info=True)``'s
    ``missing_keys``, ``unexpected_keys``, ``mismatched_keys``), naming the folder and the first tensors of
    each kind, unless it is a student's class head under a new class count (logged) or
    ``config.allow_partial_weights`` (warned)."""
    from .registry import read_config_json

    folder = Path(config.source)
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(info.get("unexpected_keys", ()))
    mismatched = sorted((k, tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ()))
    old = HFModelConfig(name=config.name, family=config.family,
                        hf_config=read_config_json(folder / "config.json")).family_classes
    new = config.family_classes
    head = [m for m in mismatched if role == "student" and old != new and _class_head_change(m[1], m[2], old, new)]
    shaped = [m for m in mismatched if m not in head]
    if missing or unexpected or shaped:
        parts = [f"{what} {_listed(keys)}" for what, keys in (
            ("missing", missing), ("unexpected", unexpected),
            ("mis-shaped", [f"{k} (file {list(a)}, model {list(b)})" for k, a, b in shaped])) if keys]
        if not config.allow_partial_weights:
            rule = ("a teacher must load every tensor of its folder" if role == "teacher" else
                    "a student may re-initialise only its class head, when its class count changes")
            raise ValueError(f"{folder}: the {role}'s weights do not all load: {'; '.join(parts)} ({rule}: fix "
                             "the folder, or pass --allow-partial-weights to start these from random values)")
        log.warning("%s: partial weights allowed (allow_partial_weights): %s; the model's tensors among them "
                    "start from random values", folder, "; ".join(parts))
    if head:
        log.warning("%s: class head re-initialised for %d classes (the folder's has %d): %s", folder, new, old,
                    ", ".join(k for k, _, _ in head))


def transformers_labels(targets: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """kd-detr targets (``labels [n]``, ``boxes [n,4]`` normalised cxcywh) -> transformers' ``labels``."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]


class HFDetector(nn.Module):
    """A transformers ``*ForObjectDetection`` model under the detector contract (see the module docstring).

    Args:
        config: the :class:`HFModelConfig`.
        model: an already built transformers model (default: :func:`build_transformers_model`).
        role: ``student`` or ``teacher``: what may differ from the folder's weights (see
            :func:`build_transformers_model`).
        load_weights: ``False``: random initialisation even with a ``source`` (a kd-detr checkpoint's tensors
            are loaded next).
    """

    own_loss = True  # the ground-truth loss comes from the family's forward (``targets=``)

    def __init__(self, config: HFModelConfig, model: Optional[nn.Module] = None, role: str = "student",
                 load_weights: bool = True):
        super().__init__()
        self.config = config.validate()
        self.family: Family = get_family(config.family)
        self.hf = model if model is not None else build_transformers_model(config, role, load_weights)
        self.register_buffer("_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ input policy
    @property
    def input_size(self) -> Optional[int]:
        if self.family.pixel_mask:
            return None
        return int(self.config.input_size or self.family.default_input_size)

    def pixels(self, images: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """kd-detr's batch (``images [B,3,H,W]`` ImageNet-normalised, ``mask [B,H,W]`` True = pad) -> the
        family's ``(pixel_values, pixel_mask)``."""
        x = images if self.family.imagenet_norm else images * self._std + self._mean
        if self.family.pixel_mask:
            if self.family.pad_multiple is not None:
                x, mask = _pad_to_multiple(x, mask, self.family.pad_multiple(self.hf.config))
            return x, None if mask is None else (~mask).long()
        return _resize_regions(x, mask, self.input_size), None

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor, mask: Optional[Tensor] = None, request: Optional[DetectorRequest] = None,
                targets: Optional[Sequence[dict[str, Tensor]]] = None) -> DetectorOutput:
        """``images [B,3,H,W]``, ``mask [B,H,W]`` -> :class:`DetectorOutput` (``targets`` in training: the
        family's own loss in ``family_losses``)."""
        request = request or DetectorRequest()
        unsupported = request.asked() - self.config.supports
        if unsupported:
            raise ValueError(f"{self.config.name} ({self.family.hf_class}) cannot return {sorted(unsupported)}"
                             + (": it has no dense attention maps (deformable attention)"
                                if "attention" in unsupported else "")
                             + (f": kd-detr reads no encoder output maps of the transformers family "
                                f"'{self.family.key}'" if "features" in unsupported else ""))
        pixel_values, pixel_mask = self.pixels(images, mask)
        captured: dict[str, Any] = {}
        hooks = [self.hf.model.register_forward_hook(lambda m, a, o: captured.__setitem__("base", o))]
        backbone = self._backbone()
        if backbone is not None:
            hooks.append(backbone.register_forward_hook(lambda m, a, o: captured.__setitem__("features", o)))
        encoder = getattr(self.hf.model, "encoder", None)
        if request.features and isinstance(encoder, nn.Module):
            hooks.append(encoder.register_forward_hook(
                lambda m, a, kw, o: captured.__setitem__("encoder", (kw, o)), with_kwargs=True))
        if self.family.layer_modules is not None:
            captured["layers"] = []
            hooks += [m.register_forward_hook(lambda m, a, o: captured["layers"].append(o))
                      for m in self.family.layer_modules(self.hf)]
        kwargs: dict[str, Any] = {}
        if request.attention:
            kwargs["output_attentions"] = True
        labels = transformers_labels(targets) if (targets is not None and self.training) else None
        every_layer = (self.family.all_layers_in_eval(self.hf) if (self.family.all_layers_in_eval and not self.training)
                       else contextlib.nullcontext())
        try:
            with every_layer:
                out = self.hf(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        layers = self.family.layers(self.hf, captured["base"], out, self.training, captured)
        logits = self._mapped(self._sigmoid_logits(layers.logits))
        boxes = layers.boxes
        result = DetectorOutput(pred_logits=logits[-1], pred_boxes=boxes[-1])
        result["aux_outputs"] = [{"pred_logits": logits[i], "pred_boxes": boxes[i]} for i in range(len(logits) - 1)]
        result["family_logits"] = layers.logits[-1]
        result["reference_points"] = (layers.reference_points if layers.reference_points is not None
                                      else boxes[-1, ..., :2].detach())
        result["query_embed"] = self.learned_queries()
        result["feature_size"] = self._feature_size(captured.get("features"), pixel_values)
        result["dn_queries"] = layers.dn_queries
        if request.attention:
            self._attention(out, result)
        if request.features:
            self._features(captured, pixel_values, result)
        if labels is not None:
            result["family_losses"] = dict(out.loss_dict)
            result["family_loss"] = out.loss
        return result

    def family_loss_weights(self, names: Sequence[str]) -> dict[str, float]:
        """The weight of each term of the family's ``loss_dict`` in its ``loss`` (0: logged only)."""
        if self.family.summed_loss:
            return {k: 1.0 for k in names}
        weights = self.family.loss_weights(self.hf.config)
        return {k: float(weights.get(k, 0.0)) for k in names}

    def _sigmoid_logits(self, logits: Tensor) -> Tensor:
        if not self.family.softmax:
            return logits
        # DETR: C classes + no-object under one softmax -> each class's probability as a sigmoid logit
        p = logits.float().softmax(-1)[..., :-1]
        return torch.logit(p, eps=1e-6).to(logits.dtype)

    def _mapped(self, logits: Tensor) -> Tensor:
        """The family's classes -> the data's (``config.class_map``); classes it lacks get a logit of -30
        (probability 1e-13: "not this class")."""
        if self.config.class_map is None:
            return logits
        index = torch.tensor(self.config.class_map, device=logits.device)
        out = logits.index_select(-1, index.clamp(min=0))
        return out.masked_fill(index < 0, -30.0)

    def learned_queries(self) -> Tensor:
        """``[Q,d]`` the model's static learned object queries, the part that plays Conditional DETR's positional
        queries (single-stage Deformable DETR: the ``query_pos`` half of its ``[Q,2d]`` embeddings). A model
        without them (``config.fixed_queries`` false: DAB-DETR's anchors, queries chosen per image) gives
        zeros: Fixed Matching, their one user, is refused for it (``config.fixed_queries_reason``)."""
        return self._query_embed()

    def _query_embed(self) -> Tensor:
        if self.family.queries is not None and self.config.fixed_queries:
            q = self.family.queries(self.hf, self.config.hf_config).detach()
            if tuple(q.shape) != (self.config.num_queries, self.config.d_model):  # a family reader out of date
                raise ValueError(f"{self.config.name}: its learned queries are {list(q.shape)}, expected "
                                 f"[{self.config.num_queries}, {self.config.d_model}]")
            return q
        return torch.zeros(self.config.num_queries, self.config.d_model, device=self._mean.device)

    def _backbone(self) -> Optional[nn.Module]:
        bb = getattr(self.hf.model, "backbone", None)
        return bb if isinstance(bb, nn.Module) else None

    def _feature_size(self, features: Any, pixel_values: Tensor) -> tuple[int, int]:
        """``(h, w)`` of the last backbone map (the C5 tokens a dense family's decoder cross-attends to)."""
        maps = [t for t in _tensors(features) if t.dim() == 4]
        if maps:
            last = min(maps, key=lambda t: t.shape[-1] * t.shape[-2])
            return int(last.shape[-2]), int(last.shape[-1])
        h, w = pixel_values.shape[-2:]
        return math.ceil(h / 32), math.ceil(w / 32)

    def _attention(self, out: Any, result: DetectorOutput) -> None:
        if float(getattr(self.hf.config, "attention_dropout", 0.0) or 0.0) > 0 and self.training:
            raise ValueError(f"{self.config.name}: attention_dropout = {self.hf.config.attention_dropout} drops "
                             "attention weights before transformers returns them; set attention_dropout = 0 "
                             "(--student-opt attention_dropout=0) to distil attention maps")
        sa, ca = out.decoder_attentions, out.cross_attentions
        if not sa or not ca:
            raise ValueError(f"{self.config.name}: transformers returned no decoder attention maps "
                             "(the eager attention implementation is needed)")
        result["self_attn"] = torch.stack(list(sa))  # [L,B,H,Q,Q]
        result["cross_attn"] = torch.stack(list(ca))  # [L,B,H,Q,S]

    def _features(self, captured: dict[str, Any], pixel_values: Tensor, result: DetectorOutput) -> None:
        """The family's encoder output maps (:attr:`Family.features`) -> ``features [B,C,h,w]`` (highest resolution
        first), ``feature_strides`` (the power of two nearest ``input height / h``) and ``feature_masks [B,h,w]``
        (True = padding; all False when every position lies inside the image)."""
        levels = sorted(self.family.features(self.hf, captured), key=lambda p: -p[0].shape[-2] * p[0].shape[-1])
        if not levels:
            raise ValueError(f"{self.config.name}: transformers returned no encoder output maps")
        height = int(pixel_values.shape[-2])
        result["features"] = [m for m, _ in levels]
        result["feature_strides"] = tuple(int(2 ** round(math.log2(height / m.shape[-2]))) for m, _ in levels)
        result["feature_masks"] = [~v if v is not None else
                                   torch.zeros(m.shape[0], *m.shape[-2:], dtype=torch.bool, device=m.device)
                                   for m, v in levels]

    # ------------------------------------------------------------------ the rest of the contract
    def heads(self, hs: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{self.config.name}: methods with their own query groups need kd-detr's "
                                  "Conditional DETR student (the transformers families run their own decoder)")

    def output_norm(self, x: Tensor) -> Tensor:
        raise ValueError(f"{self.config.name}: no shared decoder output norm is exposed")

    def decode(self, encoded: dict[str, Any], groups: Sequence[dict[str, Tensor]],
               request: Optional[DetectorRequest] = None) -> list[DetectorOutput]:
        raise ValueError(f"{self.config.name}: decode() of extra query groups needs kd-detr's "
                                  "Conditional DETR student")


def _pad_to_multiple(x: Tensor, mask: Optional[Tensor], m: int) -> tuple[Tensor, Optional[Tensor]]:
    """``x [B,3,H,W]`` and ``mask [B,H,W]`` (True = pad) padded at the bottom and right to multiples of ``m``:
    zeros (the mean colour after normalisation, as kd-detr pads) under a True mask, so the detections and the
    boxes, relative to each image's own region, do not change meaning."""
    H, W = x.shape[-2:]
    ph, pw = -H % m, -W % m
    if mask is None and (ph or pw):
        mask = torch.zeros(x.shape[0], H, W, dtype=torch.bool, device=x.device)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
        mask = F.pad(mask, (0, pw, 0, ph), value=True)
    return x, mask


def _resize_regions(x: Tensor, mask: Optional[Tensor], size: int) -> Tensor:
    """Each image's own region (``mask`` False) of ``x [B,3,H,W]`` resized bilinearly to ``[B,3,S,S]``:
    ``F.interpolate(crop, (S, S), mode="bilinear", align_corners=False)`` per image, written as one
    ``grid_sample`` with the crop sizes as tensors, so that it batches and traces (ONNX) at any size."""
    B, _, H, W = x.shape
    if mask is None:
        h = torch.full((B,), H, dtype=x.dtype, device=x.device)
        w = torch.full((B,), W, dtype=x.dtype, device=x.device)
    else:
        valid = ~mask
        h = valid.any(2).sum(1).clamp(min=1).to(x.dtype)
        w = valid.any(1).sum(1).clamp(min=1).to(x.dtype)
    d = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5

    def source(n: Tensor, full: int) -> Tensor:  # [B,S] pixel coordinates, as interpolate computes them
        src = (d[None] * (n[:, None] / size) - 0.5).clamp(min=0)
        src = torch.minimum(src, n[:, None] - 1)
        return src / max(full - 1, 1) * 2 - 1

    gy, gx = source(h, H), source(w, W)
    grid = torch.stack([gx[:, None, :].expand(B, size, size), gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _tensors(obj: Any) -> list[Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    if hasattr(obj, "to_tuple"):
        return _tensors(obj.to_tuple())
    return []
