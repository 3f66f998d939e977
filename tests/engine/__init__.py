"""kd_detr.engine and evaluation: training, resume, checkpoints, DDP, recipes, TensorBoard, golden logs, COCO
evaluation."""
