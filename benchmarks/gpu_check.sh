#!/usr/bin/env bash
# The prepared GPU check of issue 11 on a lent H100/H200 (no network; the steps take at most 7 minutes).
#
# Here, first (needs the registries; ~160 MB of downloads, then xz for a while):
#     bash benchmarks/gpu_wheels.sh            # fills .whl/a (~53 MB) and .whl/b (~50 MB), ignored by git
# Then, from a session with a device, two `run` calls BACK TO BACK (the machine keeps its files only while
# warm, 30 s after a call; each call may carry 64 MiB, and the set is ~103 MB):
#     run(command="bash benchmarks/gpu_check.sh --install-only", carry=[".whl/a"], timeout_s=120)
#     run(command="bash benchmarks/gpu_check.sh", carry=[".whl/b"], timeout_s=540)
# (with one call able to carry both parts, one call: carry [".whl"]). Back here:
#     python benchmarks/gpu_report.py <files_at>/gpu_check.json   # -> benchmarks/results/gpu_check.md
#
# It installs what .whl/ holds into .gpu-site/ (ignored by git, so a warm machine keeps it between calls;
# the image's torch 2.11 / transformers 5.17 / pyarrow / numpy stay), then runs benchmarks/gpu_check.py:
# versions and imports, transformers annotation throughput on the demo's LLaVA and on a real-vitb16-sized
# one (vLLM cannot travel: the output says why), and the emoji demo's generation 0 + 1 on CUDA in bf16 with
# seconds and peak GPU memory per stage. Output: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/log.txt.
#
#     bash benchmarks/gpu_check.sh [--install-only] [--cpu-dry] [--out DIR] [--budget-s S]
#
# --cpu-dry: the same steps on the CPU at toy size, with this checkout's python and packages (no install);
# the tests run it. --budget-s: seconds for the steps after the install (default 420).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
install_only=0
out="${OUT:-/tmp/gpu-check-out}"
budget=420
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry) mode=cpu-dry; shift ;;
    --install-only) install_only=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; out="$2"; shift 2 ;;
    --budget-s) [ $# -ge 2 ] || { echo "error: --budget-s needs seconds" >&2; exit 2; }; budget="$2"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (expected --install-only, --cpu-dry, --out DIR, --budget-s S)" >&2
       exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "error: --budget-s '$budget': expected whole seconds" >&2; exit 2 ;; esac
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$mode" = cpu-dry ] && [ "$install_only" = 1 ]; then
  echo "error: --install-only installs carried wheels on the GPU machine; --cpu-dry installs nothing" >&2
  exit 2
fi
if [ "$mode" = gpu ]; then
  py=python3
  site="$PWD/.gpu-site"
  mkdir -p "$site"
  t0=$(date +%s)
  found=0
  for part in .whl .whl/a .whl/b; do
    [ -d "$part" ] || continue
    if ls "$part"/*.whl >/dev/null 2>&1; then
      # --no-deps: the image's torch, transformers, pyarrow, numpy stay; only what it lacks is added
      $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$part"/*.whl
      found=1
    fi
    for archive in "$part"/*-site.tar.xz; do
      [ -f "$archive" ] || continue
      $py -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$archive" "$site"
      found=1
    done
    [ -f "$part/NotoColorEmoji-subset.ttf" ] && cp "$part/NotoColorEmoji-subset.ttf" "$site/"
    [ -d "$part/lib" ] && mkdir -p "$site/lib" && cp "$part"/lib/* "$site/lib/"
  done
  if [ "$found" = 0 ]; then
    echo "error: no carried wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' here first and carry .whl/a, .whl/b" >&2
    exit 2
  fi
  echo "[gpu_check] installed what .whl/ holds into .gpu-site/ in $(( $(date +%s) - t0 )) s"
  export PYTHONPATH="$site:$PWD" LD_LIBRARY_PATH="$site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ "$install_only" = 1 ]; then
    echo "[gpu_check] part installed; now, within 30 s: bash benchmarks/gpu_check.sh with the next part carried"
    exit 0
  fi
  if ! missing=$($py -c "
import importlib.util as u
need = ['open_clip', 'deepspeed', 'lancedb', 'lance', 'omegaconf', 'pydantic', 'peft', 'timm']
print(' '.join(m for m in need if u.find_spec(m) is None))" 2>&1) || [ -n "$missing" ]; then
    echo "error: still missing on this machine: $missing (the first call's part was lost: the machine was not" \
      "warm any more; run the two calls back to back)" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
  py="${PYTHON:-python}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cpu
fi

dry=()
[ "$mode" = cpu-dry ] && dry=(--cpu-dry)
set +e
"$py" benchmarks/gpu_check.py --out "$out" --budget-s "$budget" "${dry[@]}" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
exit "$rc"
