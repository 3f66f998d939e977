"""kd_detr.methods: D3ETR (matching, KD losses), MS-DETR, Co-DETR, their recipe switches and capabilities, and a
smoke test of every shipped recipe."""
