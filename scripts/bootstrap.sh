#!/usr/bin/env bash
# One entry point for a fresh machine: system packages, the Python environment, then the demo or the tests.
#   bash scripts/bootstrap.sh demo [key=value ...]   set up, then run the demo cycle on the built-in data
#   bash scripts/bootstrap.sh test [pytest args]     set up, then run the test suite
#   bash scripts/bootstrap.sh env                    set up only; prints the venv path
# The venv lives outside the clone, keyed by a hash of pyproject.toml, so CI and later clones reuse it;
# from nothing it builds in a few minutes. HQCLIP_VENV overrides its location.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
what=${1:-test}; shift || true

# A full disk fails late and obscurely (a test suite erroring for an hour): refuse up front, in one line.
# The floors leave room over what each takes (the suite's peak: benchmarks/results/suite_disk.md).
case "$what" in test) need_gib=3 ;; demo) need_gib=2 ;; *) need_gib=0 ;; esac
need_gib=${HQCLIP_NEED_FREE_GIB:-$need_gib}
for dir in "${TMPDIR:-/tmp}" "$here"; do
  free_kib=$(df -Pk "$dir" | awk 'NR==2 {print $4}')
  if [ "${free_kib:-0}" -lt $((need_gib * 1024 * 1024)) ]; then
    echo "[bootstrap] $dir has $((free_kib / 1024)) MiB free; the $what needs about $need_gib GiB: free some disk first" >&2
    exit 1
  fi
done

# System packages: the emoji font the built-in dataset renders, a C++ toolchain for DeepSpeed's JIT op,
# and Chromium for the report's browser test. Installed only where missing, and only where apt is usable.
need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
command -v g++ >/dev/null || need+=(g++)
command -v ninja >/dev/null || need+=(ninja-build)
if [ "$what" = test ]; then command -v chromium >/dev/null || need+=(chromium); fi
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "[bootstrap] apt-get install ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "[bootstrap] missing system packages: ${need[*]} (install them with your package manager;" \
         "the font can also be given as data.emoji.font=PATH)" >&2
  fi
fi

py=${PYTHON:-python3}
key=$(cat pyproject.toml | sha256sum | cut -c1-16)
venv=${HQCLIP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hqclip/venv-$key}
if [ ! -f "$venv/.complete" ]; then
  echo "[bootstrap] building $venv (first time for this pyproject.toml: a few minutes)"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q -e ".[test]"
  touch "$venv/.complete"
fi
# Point the (cached) venv's editable install at this clone; cheap, and right after a clone moves. The check
# runs from / with -P, so a `cycle/` folder in the current directory cannot answer for the venv.
if ! (cd / && "$venv/bin/python" -P "$here/scripts/venv_points_at.py" "$here"); then
  echo "[bootstrap] pointing $venv at $here"
  "$venv/bin/pip" install -q --no-deps -e . >/dev/null
fi
export PATH="$venv/bin:$PATH"
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}

case "$what" in
  env)  echo "$venv" ;;
  demo) exec hqclip demo "$@" ;;
  test) export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
        ruff check . && ruff format --check . >/dev/null  # lint and format (pyproject's [tool.ruff]) first
        # only failed tests keep their tmp folders (pytest keeps every test's, of the last 3 runs, by default)
        exec python -m pytest -q -o tmp_path_retention_policy=failed "$@" ;;
  *) echo "usage: bash scripts/bootstrap.sh {demo|test|env} [args]" >&2; exit 2 ;;
esac
