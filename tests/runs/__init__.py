"""kd_detr.runs and the kd-detr command line: distil / compare / quickstart end to end, the zoo of recipes and
teacher cards."""
