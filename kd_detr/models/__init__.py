"""Detectors: the detector contract, Conditional DETR (registry, architecture) and checkpoint I/O."""

from .attention import ConditionalAttention
from .backbone import Backbone, load_backbone_weights
from .checkpoint import (
    convert_official,
    load_model,
    load_official_state_dict,
    model_from_official,
    official_state_dict,
    read_official_checkpoint,
    save_model,
)
from .conditional_detr import ConditionalDETR, inverse_sigmoid
from .detector import Detector, DetectorOutput, DetectorRequest
from .position_encoding import PositionEmbeddingSine, sine_embed_points
from .config import ModelConfig
from .hf.config import HFModelConfig
from .registry import build_model, config_from_dict, get_config, list_models, register_model

__all__ = [
    "Backbone",
    "ConditionalAttention",
    "ConditionalDETR",
    "Detector",
    "DetectorOutput",
    "DetectorRequest",
    "HFModelConfig",
    "ModelConfig",
    "config_from_dict",
    "PositionEmbeddingSine",
    "build_model",
    "convert_official",
    "get_config",
    "inverse_sigmoid",
    "list_models",
    "load_backbone_weights",
    "load_model",
    "load_official_state_dict",
    "model_from_official",
    "official_state_dict",
    "read_official_checkpoint",
    "register_model",
    "save_model",
    "sine_embed_points",
]
