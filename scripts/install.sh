#!/usr/bin/env bash
# Creates .venv/ and installs sodp3d into it (editable, with test extras).
# Called by `make install`; safe to run again (it only adds what is missing).
#
# Choices it makes:
#   * CUDA or CPU: a working `nvidia-smi -L` means CUDA. CUDA machines get the
#     default torch build and the full `open3d`; CPU machines get torch $TORCH_VERSION
#     (a local or index CPU wheel, never the multi-GB CUDA build) and `open3d-cpu`.
#     Force one with SODP3D_DEVICE=cpu|cuda.
#   * System libraries: Open3D needs libusb-1.0 and headless MuJoCo rendering needs
#     EGL (Mesa). As root with apt-get they are installed; otherwise the script
#     stops and names the packages.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
# Extra index for the CPU torch wheel when no local wheel is available, for example
# PyTorch's own CPU index. Empty: use pip's configured indexes and find-links.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-}

say() { printf 'sodp3d install: %s\n' "$*"; }

# --- system libraries -------------------------------------------------------
missing=()
libs=$(ldconfig -p 2>/dev/null || true)  # read once: grep -q on a pipe trips pipefail
have_lib() { case "$libs" in *"$1"*) return 0 ;; *) return 1 ;; esac; }
have_lib 'libusb-1.0.so.0' || missing+=(libusb-1.0-0)
have_lib 'libEGL.so.1' || missing+=(libegl1)
have_lib 'libOpenGL.so.0' || missing+=(libopengl0)
[ -e /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so ] || ls /usr/lib/*/dri/*swrast* >/dev/null 2>&1 \
  || ls /usr/lib/*/dri/*llvmpipe* >/dev/null 2>&1 || missing+=(libgl1-mesa-dri libegl-mesa0)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    say "missing system packages: ${missing[*]}"
    say "install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run make again"
    exit 1
  fi
fi

# --- python -----------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  say "Python >= 3.10 is needed, $PYTHON is $("$PYTHON" --version 2>&1)"; exit 1
fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

device=${SODP3D_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi

if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  if [ "$device" = cuda ]; then
    say "CUDA machine: installing torch $TORCH_VERSION (CUDA build)"
    # Local CPU wheels in pip's find-links would win the version tie: ignore them.
    PIP_FIND_LINKS= "${PIP[@]}" install -q "torch==$TORCH_VERSION"
  else
    say "CPU machine: installing torch $TORCH_VERSION (CPU build)"
    if [ -n "$TORCH_CPU_INDEX" ]; then
      "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX"
    else
      "${PIP[@]}" install -q "torch==$TORCH_VERSION"
    fi
  fi
fi

# torchvision (the image encoder's ResNet) must be the release built against the torch
# that is there: 0.(minor + 15), e.g. torch 2.13 -> torchvision 0.28. Installed with
# --no-deps so it can never pull another torch. PyPI has no CPU build of it: on a CPU
# torch its C++ ops (nms, roi_align) do not load, which the image encoder does not need
# (encoders/image.py imports it accordingly).
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("torchvision")' >/dev/null 2>&1; then
  tv=$("$VENV/bin/python" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"0.{int(v[1]) + 15}.*")')
  say "installing torchvision==$tv (matching torch)"
  "${PIP[@]}" install -q --no-deps "torchvision==$tv"
fi

extra=cpu; [ "$device" = cuda ] && extra=gpu
say "installing sodp3d (editable, extras: $extra,test)"
"${PIP[@]}" install -q -e ".[$extra,test]"
MUJOCO_GL=egl "$VENV/bin/python" - <<'PY'
import mujoco
import open3d
import torch

device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"sodp3d install: ok (torch {torch.__version__} on {device}, mujoco {mujoco.__version__}, open3d {open3d.__version__})")
PY
