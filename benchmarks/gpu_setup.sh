#!/usr/bin/env bash
# On the GPU host: installs the parts of .gpu/ (benchmarks/gpu_pack.sh) that this call carried, and writes
# /tmp/gpu-env.sh (PATH, PYTHONPATH and the package's configs) for later calls to source.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p /tmp/gpu-site /tmp/gpu-bin
if [ -f .gpu/a/ffmpeg.tar.xz ]; then tar -C /tmp/gpu-bin -xJf .gpu/a/ffmpeg.tar.xz; fi
if compgen -G ".gpu/a/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-site .gpu/a/*.whl 2>&1 \
    | grep -v -i warning || true
fi
if [ -f .gpu/b/site.tar.xz ]; then
  tar -C /tmp/gpu-site -xJf .gpu/b/site.tar.xz && cp .gpu/b/demo1_* /tmp/ && mkdir -p tests/data && cp .gpu/b/*.pt tests/data/
fi
if [ -f .gpu/c/install.sh ]; then
  bash .gpu/c/install.sh >/dev/null
  # the packer unzips Ray's wheel, which drops the executable bits of its binaries (gcs_server, raylet)
  find /tmp/gpu-site/ray/core -type f ! -name "*.py" -exec chmod +x {} +
fi
# the package runs from the checkout, whose configs/ ships as lipsync_ray.configs when installed
cat > /tmp/gpu-env.sh <<EOF
export PATH=/tmp/gpu-bin:\$PATH PYTHONPATH=/tmp/gpu-site:$PWD PYTHONUNBUFFERED=1
[ -e $PWD/lipsync_ray/configs ] || ln -s ../configs $PWD/lipsync_ray/configs
EOF
source /tmp/gpu-env.sh
python3 - <<'PY'
import importlib, shutil
for name in ("diffusers", "kornia", "av", "whisper", "ai_edge_litert", "pydantic", "ray"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "ok"))
    except Exception as err:
        print(name, "missing:", err)
print("ffmpeg", shutil.which("ffmpeg"), "ffprobe", shutil.which("ffprobe"))
PY
