"""Hugging Face transformers' DETR families as kd-detr detectors (optional: ``pip install "kd-detr[hf]"``)."""

from .adapter import HFDetector, build_transformers_model, transformers_labels
from .config import HF_PREFIX, HFModelConfig
from .families import FAMILIES, Family, get_family
from .registry import hf_config, is_hf_name, list_hf_models

__all__ = ["FAMILIES", "Family", "HFDetector", "HFModelConfig", "HF_PREFIX", "build_transformers_model",
           "get_family", "hf_config", "is_hf_name", "list_hf_models", "transformers_labels"]
