#!/usr/bin/env bash
# Pack Python dependencies for an offline x86-64 GPU host with Python 3.12 whose image already has torch,
# (Copied from the team's shared GPU tooling; gpu_pack.sh calls it for the Ray part.)
# numpy, pandas, pyarrow, opencv and friends (check what it has first: `python3 -m pip list` there).
#
#   pack-gpu-deps.sh OUTDIR [PKG[==VER] ...]
#
# OUTDIR gets wheels/ (the named packages, no dependencies: name every missing one), ray.tar.xz (Ray repacked
# without its Java jars and RLlib: the plain wheel is ~80 MB, this is ~27 MB) and install.sh. On the GPU host:
#   bash OUTDIR/install.sh && export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
# Ray's own runtime needs (jsonschema and its deps) are always added. Source-only packages (e.g. openai-whisper)
# are built into wheels here. Set RAY_VERSION to pin Ray (default: the version installed here, else newest).
set -euo pipefail
out=${1:?usage: pack-gpu-deps.sh OUTDIR [PKG ...]}; shift
mkdir -p "$out/wheels"
plat=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
ray_ver=${RAY_VERSION:-$(python3 -c 'import ray; print(ray.__version__)' 2>/dev/null || true)}
base=(jsonschema jsonschema-specifications referencing rpds-py attrs)
for pkg in "${base[@]}" "$@"; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$out/wheels" "$pkg" 2>/dev/null; then
    # pure-Python source distributions: build a wheel here (any platform)
    python3 -m pip wheel -q --no-deps -w "$out/wheels" "$pkg"
  fi
done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: "${plat[@]}" -d "$tmp" "ray${ray_ver:+==$ray_ver}"
mkdir "$tmp/x" && (cd "$tmp/x" && python3 -m zipfile -e "$tmp"/ray-*.whl .)
tar -C "$tmp/x" --exclude=ray/jars --exclude=ray/rllib -cf - . | xz -T0 -9 > "$out/ray.tar.xz"
cat > "$out/install.sh" <<'SH'
#!/usr/bin/env bash
# Installs the packed dependencies into /tmp/gpu-site (no network needed).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p /tmp/gpu-site
tar -C /tmp/gpu-site -xJf "$here/ray.tar.xz"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-site "$here"/wheels/*.whl 2>&1 | grep -v -i warning || true
echo "installed into /tmp/gpu-site: export PYTHONPATH=/tmp/gpu-site\${PYTHONPATH:+:\$PYTHONPATH}"
SH
chmod +x "$out/install.sh"
du -sh "$out"
