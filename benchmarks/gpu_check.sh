#!/usr/bin/env bash
# The prepared GPU check of issue 11: one call on a lent H100/H200, no network, at most 8 minutes.
#
# Here, first (needs the registries; ~160 MB of downloads, ~55 MiB carried):
#     bash benchmarks/gpu_wheels.sh            # fills .whl/ (ignored by git)
# then, from a session with a device, one `run` with carry [".whl"] and timeout_s 540:
#     bash benchmarks/gpu_check.sh
# and back here:
#     python benchmarks/gpu_report.py <files_at>/gpu_check.json   # -> benchmarks/results/gpu_check.md
#
# What it does: installs the carried wheels into /tmp/site (the image's torch 2.11 / transformers 5.17 /
# peft / pyarrow stay), then benchmarks/gpu_check.py: versions and imports, transformers annotation
# throughput on the demo's LLaVA and on a real-vitb16-sized one (vLLM cannot travel: the script says why),
# and the emoji demo's generation 0 + 1 on CUDA in bf16 with seconds and peak GPU memory per stage.
# Output: $OUT/gpu_check.json, $OUT/gpu_check.md, $OUT/log.txt.
#
#     bash benchmarks/gpu_check.sh [--cpu-dry] [--out DIR] [--budget-s S]
#
# --cpu-dry: the same steps on the CPU at toy size, with this checkout's python and packages (no install);
# the tests run it. --budget-s: seconds for the steps after the install (default 420 on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
out="${OUT:-/tmp/gpu-check-out}"
budget=420
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry) mode=cpu-dry; shift ;;
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; out="$2"; shift 2 ;;
    --budget-s) [ $# -ge 2 ] || { echo "error: --budget-s needs seconds" >&2; exit 2; }; budget="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "error: unknown argument '$1' (expected --cpu-dry, --out DIR, --budget-s S)" >&2; exit 2 ;;
  esac
done
case "$budget" in ''|*[!0-9]*) echo "error: --budget-s '$budget': expected whole seconds" >&2; exit 2 ;; esac
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$mode" = gpu ]; then
  py=python3
  if [ ! -f .whl/lance-site.tar.xz ] || ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no carried wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' here first and carry .whl" >&2
    exit 2
  fi
  t0=$(date +%s)
  # --no-deps: the image's torch, transformers, peft, pyarrow, numpy stay; only what it lacks is added
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  # lancedb + pylance travel as one xz archive of their installed files: their wheels are 160 MB
  $py -c "import tarfile; tarfile.open('.whl/lance-site.tar.xz').extractall('/tmp/site', filter='data')"
  export PYTHONPATH="/tmp/site:$PWD"
  echo "[gpu_check] installed the carried wheels in $(( $(date +%s) - t0 )) s"
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
