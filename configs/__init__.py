"""Model and pipeline configs, installed as the `lipsync_ray.configs` package so that every install finds them."""
