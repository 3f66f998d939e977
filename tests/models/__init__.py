"""kd_detr.models: the detector contract, Conditional DETR, the transformers families, checkpoints and exports;
the ground-truth criterion and matcher every student trains with."""
