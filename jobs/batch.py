"""Bulk job entry point for `ray job submit` (same options as `lipsync-ray batch`; see the README's cluster section):

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/batch.py \
        --catalog s3://bucket/catalog.parquet --output s3://bucket/out --model latentsync-1.6 --gpu
"""

import sys

from lipsync_ray.cli import app

if __name__ == "__main__":
    app(["batch", *sys.argv[1:]], prog_name="jobs/batch.py")
