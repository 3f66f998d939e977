"""kd-detr: knowledge distillation for DETR-style object detectors."""

__version__ = "0.1.0"
