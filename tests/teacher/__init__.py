"""kd_detr.teacher: teacher outputs, the cache store and its build pipelines, Ray start-up, actors and serving,
teacher loading and precision."""
