"""kd_detr.data: COCO datasets and their validation, label maps, replayable augmentation, view plans, the
synthetic generator, collation."""
