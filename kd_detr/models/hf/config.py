"""The architecture of a Hugging Face transformers detector as kd-detr sees it: :class:`HFModelConfig`.

It carries the transformers config as a plain dict (``hf_config``, what ``config.json`` of a
``save_pretrained`` folder holds), the family, where the weights came from and the input policy, and it
answers the fields of the detector contract (``num_classes``, ``num_queries``, ``dec_layers``, ``d_model``,
``nheads``, ``stride``, ``supports``) from the transformers config, whatever each family calls them.
Like :class:`~kd_detr.models.ModelConfig` it is serialised into kd-detr checkpoints, so a file rebuilds
its model without the folder it came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["HFModelConfig", "HF_PREFIX"]

HF_PREFIX = "hf:"


@dataclass
class HFModelConfig:
    """A transformers DETR-family detector.

    Attributes:
        name: ``hf:DIR`` for a ``save_pretrained`` folder, or a registered tiny name (``hf_rt_detr_tiny``).
        family: key of :data:`kd_detr.models.hf.families.FAMILIES` (``detr``, ``rt_detr``, ...).
        hf_config: the transformers config as a dict (``PretrainedConfig.to_dict()``).
        source: the folder whose weights initialise the model (``None``: random initialisation).
        input_size: side of the square input of fixed-size families (RT-DETR, D-FINE, ...: each image's view
            is resized to ``input_size x input_size``, as their image processors do); ``None`` for families
            that take padded batches with a pixel mask (DETR, Conditional/DAB/Deformable DETR).
        class_map: for a teacher loaded against data with another label map: the family's class index of each
            of the data's ``C`` classes (``-1``: the family has no such class). The adapter's logits then have
            the data's ``C`` classes in the data's order (:func:`kd_detr.models.hf.labels.class_map_by_name`).
        allow_partial_weights: build from ``source`` even when some of its tensors are missing, unexpected or
            of another shape (those start from random values; each load says which). Off: a teacher loads
            every tensor or is refused, a student may re-initialise only its class head when its class count
            changes (``--allow-partial-weights`` sets it; serialised, so a run and its checkpoints record it).
        hub: for a Hub id (``hf:org/name[@revision]``): the repository, the revision asked for, the commit it
            resolved to and each weight file's SHA-256 (:meth:`kd_detr.models.hf.hub.HubSnapshot.record`).
    """

    name: str
    family: str
    hf_config: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    input_size: Optional[int] = None
    description: str = ""
    class_map: Optional[list[int]] = None
    allow_partial_weights: bool = False
    hub: Optional[dict[str, Any]] = None

    # ------------------------------------------------------------------ the detector contract's fields
    def _get(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.hf_config.get(k) is not None:
                return self.hf_config[k]
        return default

    @property
    def family_classes(self) -> int:
        """The family's own class count (``num_labels``; DETR's no-object slot not counted)."""
        return int(self._get("num_labels", default=len(self.hf_config.get("id2label") or {}) or 91))

    @property
    def num_classes(self) -> int:
        """``C``: the classes the adapter's logits have (no no-object slot: DETR's is folded in)."""
        return len(self.class_map) if self.class_map is not None else self.family_classes

    @property
    def num_queries(self) -> int:
        """``Q``: the queries the model outputs at inference (DAB-DETR: anchors x patterns; two-stage Deformable
        DETR: its proposals), not necessarily the config's ``num_queries``."""
        from .families import get_family

        return int(get_family(self.family).count_queries(self.hf_config))

    @property
    def dec_layers(self) -> int:
        return int(self._get("decoder_layers", "num_decoder_layers", default=6))

    @property
    def d_model(self) -> int:
        return int(self._get("d_model", "hidden_size", default=256))

    @property
    def nheads(self) -> int:
        return int(self._get("decoder_attention_heads", "decoder_n_heads", "num_attention_heads", default=8))

    @property
    def dim_feedforward(self) -> int:
        return int(self._get("decoder_ffn_dim", "decoder_ffn_dim", default=1024))

    @property
    def dropout(self) -> float:
        return float(self._get("dropout", default=0.0))

    @property
    def activation(self) -> str:
        return str(self._get("activation_function", "decoder_activation_function", default="relu"))

    @property
    def pe_temperature(self) -> int:
        return int(self._get("temperature", default=10000))

    @property
    def stride(self) -> int:
        """Stride of the map a dense family's decoder cross-attends to (C5: 32)."""
        return 32

    @property
    def feature_levels(self) -> int:
        """Encoder output maps ``DetectorRequest(features=True)`` returns (0: the family gives none)."""
        from .families import get_family

        family = get_family(self.family)
        return int(family.feature_levels(self.hf_config)) if family.features is not None else 0

    @property
    def feature_channels(self) -> int:
        """Width of the encoder output maps (the hybrid encoder's ``encoder_hidden_dim`` for RT-DETR-like
        families, else ``d_model``)."""
        from .families import get_family

        width = get_family(self.family).feature_width
        return int(width(self.hf_config)) if width is not None else self.d_model

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.hf_config.get("id2label") or {}).items()}

    @property
    def supports(self) -> frozenset[str]:
        """The :class:`~kd_detr.models.DetectorRequest` fields the family's adapter honours."""
        from .families import get_family

        return get_family(self.family).supports

    @property
    def fixed_queries(self) -> bool:
        """Whether this model has static learned ``[Q,d]`` object queries (Fixed Matching can hand them to a
        student); it depends on the configuration (two-stage Deformable DETR has none)."""
        return self.fixed_queries_reason is None

    @property
    def fixed_queries_reason(self) -> Optional[str]:
        """Why this model has no static ``[Q,d]`` queries (``None``: it has them)."""
        from .families import get_family

        family = get_family(self.family)
        reason = family.dynamic_queries(self.hf_config)
        if reason is None and family.queries is None:  # no reader: never hand over placeholder zeros
            return "kd-detr's adapter for this family reads no learned queries"
        return reason

    # ------------------------------------------------------------------ (de)serialisation
    def validate(self) -> "HFModelConfig":
        from .families import get_family

        get_family(self.family)
        _check_hf_config(self.hf_config)
        if self.input_size is not None and int(self.input_size) < 32:
            raise ValueError(f"input_size must be >= 32 (pixels), got {self.input_size}")
        if self.family_classes < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.family_classes}")
        if self.class_map is not None and any(not -1 <= int(i) < self.family_classes for i in self.class_map):
            raise ValueError(f"class_map indexes outside the family's {self.family_classes} classes")
        if self.num_queries < 1:
            raise ValueError(f"num_queries = {self.num_queries}: a detector needs at least one query")
        if not isinstance(self.allow_partial_weights, bool):
            raise ValueError(f"allow_partial_weights must be true or false, got {self.allow_partial_weights!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": "hf", **dataclasses.asdict(self)}
        if not d["allow_partial_weights"]:
            # recorded only when set: every config serialised before the field existed (checkpoints, cache
            # headers that a resumed build compares field by field) stays the same dict
            del d["allow_partial_weights"]
        if d["hub"] is None:  # likewise: only a Hub id's config records it
            del d["hub"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HFModelConfig":
        data = {k: v for k, v in data.items() if k != "kind"}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown HFModelConfig field(s) {unknown}; valid: {sorted(valid)}")
        return cls(**data).validate()

    def replace(self, **changes: Any) -> "HFModelConfig":
        """Copy with ``changes``: ``num_classes`` (sets ``num_labels`` and a generic ``id2label``),
        ``input_size``, or any key of the transformers config (``num_queries``, ``decoder_layers`` ...), a
        nested one by its dotted path (``backbone_config.hidden_sizes``); another key raises ``ValueError``
        listing the valid ones."""
        hf = json.loads(json.dumps(self.hf_config, default=str))
        input_size = self.input_size
        partial = self.allow_partial_weights
        for key, value in changes.items():
            if key == "num_classes":
                value = int(value)
                if self.class_map is not None and value != self.num_classes:
                    raise ValueError(f"{self.name}: its classes are mapped to the data's {self.num_classes}; "
                                     f"num_classes cannot become {value}")
                if self.class_map is None and value != self.num_classes:
                    hf["num_labels"] = value
                    hf["id2label"] = {str(i): f"class_{i}" for i in range(value)}
                    hf["label2id"] = {f"class_{i}": i for i in range(value)}
            elif key == "input_size":
                input_size = None if value is None else int(value)
            elif key == "allow_partial_weights":
                partial = value
            elif key in hf:
                hf[key] = value
            elif "." in key and key.split(".", 1)[0] in hf:
                _set_nested(hf, key, value, self.name)
            else:
                raise ValueError(f"unknown model override {key!r} for {self.name} ({self.family}); valid keys: "
                                 "num_classes, input_size, allow_partial_weights and the transformers config's: "
                                 f"{sorted(hf)}")
        return dataclasses.replace(self, hf_config=hf, input_size=input_size,
                                   allow_partial_weights=partial).validate()


# attention implementations that run from transformers' own code: anything else (flash_attention_*, flex, a Hub
# kernel "org/repo") needs a package or a download that kd-detr does not vouch for
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
_ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")


def _check_hf_config(hf: Any, where: str = "") -> None:
    """Refuse, by name, what would break or reach out later: an ``id2label`` key that is not an integer, an
    attention implementation other than eager/sdpa (also in sub-configs such as ``backbone_config``)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where or 'the transformers config'} is not a JSON object (got {type(hf).__name__})")
    labels = hf.get("id2label")
    if labels is not None:
        if not isinstance(labels, dict):
            raise ValueError(f"{where}id2label must be an object {{\"0\": \"name\", ...}}, got "
                             f"{type(labels).__name__}")
        for k in labels:
            try:
                int(k)
            except (TypeError, ValueError):
                raise ValueError(f"{where}id2label key {k!r} is not an integer class index") from None
    for key in _ATTN_KEYS:
        value = hf.get(key)
        values = value.values() if isinstance(value, dict) else [value]
        for v in values:
            if v is not None and v not in ATTN_IMPLEMENTATIONS:
                raise ValueError(f"{where}{key} = {v!r} is not supported: kd-detr runs transformers' "
                                 f"{' or '.join(ATTN_IMPLEMENTATIONS)} attention only (remove the key or set one of "
                                 "them)")
    for key, value in hf.items():
        if isinstance(value, dict) and key.endswith("_config"):
            _check_hf_config(value, f"{where}{key}.")


def _set_nested(hf: dict[str, Any], key: str, value: Any, name: str) -> None:
    """Set ``hf["a"]["b"] = value`` for ``key = "a.b"``: every part must exist, so a typo is an error naming the
    sub-config's valid keys rather than a field the model silently ignores."""
    node = hf
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            valid = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"unknown model override {key!r} for {name}: {where} has no key {part!r}; valid keys "
                             f"there: {valid}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]
