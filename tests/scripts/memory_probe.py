"""Resident memory after every written frame of `lipsync-ray run` on VIDEO AUDIO OUTPUT, for test_chunks: prints the
frame count, then one figure in MiB per frame."""
import os, sys
from lipsync_ray.config import LipSyncConfig
from lipsync_ray.pipeline import LipSyncPipeline
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
pipeline = LipSyncPipeline(LipSyncConfig(model="tiny-random", steps=1, detector="offline", windows_per_chunk=4))
trace = []
result = pipeline.run(sys.argv[1], sys.argv[2], sys.argv[3], progress=lambda n: trace.extend([rss()] * n))
print(result.frames, *trace)
