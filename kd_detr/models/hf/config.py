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
    """

    name: str
    family: str
    hf_config: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    input_size: Optional[int] = None
    description: str = ""
    class_map: Optional[list[int]] = None

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
        return int(self._get("num_queries", default=300))

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
    def id2label(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.hf_config.get("id2label") or {}).items()}

    @property
    def supports(self) -> frozenset[str]:
        """The :class:`~kd_detr.models.DetectorRequest` fields the family's adapter honours."""
        from .families import get_family

        return get_family(self.family).supports

    @property
    def fixed_queries(self) -> bool:
        """Whether the family has learned object queries (Fixed Matching can hand them to a student)."""
        from .families import get_family

        return get_family(self.family).fixed_queries

    # ------------------------------------------------------------------ (de)serialisation
    def validate(self) -> "HFModelConfig":
        from .families import get_family

        get_family(self.family)
        if self.input_size is not None and int(self.input_size) < 32:
            raise ValueError(f"input_size must be >= 32 (pixels), got {self.input_size}")
        if self.family_classes < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.family_classes}")
        if self.class_map is not None and any(not -1 <= int(i) < self.family_classes for i in self.class_map):
            raise ValueError(f"class_map indexes outside the family's {self.family_classes} classes")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "hf", **dataclasses.asdict(self)}

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
        ``input_size``, or any key of the transformers config (``num_queries``, ``decoder_layers`` ...);
        another key raises ``ValueError`` listing the valid ones."""
        hf = json.loads(json.dumps(self.hf_config, default=str))
        input_size = self.input_size
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
            elif key in hf:
                hf[key] = value
            else:
                raise ValueError(f"unknown model override {key!r} for {self.name} ({self.family}); valid keys: "
                                 f"num_classes, input_size and the transformers config's: {sorted(hf)}")
        return dataclasses.replace(self, hf_config=hf, input_size=input_size).validate()
