#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with exactly what benchmarks/gpu_check.sh needs on a lent GPU machine that
# reaches no network. That image has python 3.12 with torch 2.11, torchvision 0.26, transformers 5.17,
# tokenizers, safetensors, accelerate, huggingface_hub 1.33, pyarrow, numpy, pillow, matplotlib, click, rich,
# tqdm, pyyaml, einops, msgpack, ninja, psutil, py-cpuinfo (/work/.library/device/KINDS.md). It lacks:
#
#   open_clip_torch 3.3.0 (+ ftfy, wcwidth), timm 1.0.31 and peft 0.21.2 (the versions tested here),
#   deepspeed 0.19.8 (sdist only on PyPI: built here into a pure-python wheel, no ops compiled) + hjson,
#   pydantic 2.14 (+ pydantic-core, annotated-types, typing-inspection, typing_extensions),
#   omegaconf 2.4.0, lancedb 0.40.0 + pylance 14.0.2 (+ lance-namespace, its client, deprecation, overrides),
#   the emoji font (the data stage renders with it): Noto Color Emoji cut down to the 424 candidate
#   objects' glyphs (~1 MB; pixel-identical renders, checked here), and libfribidi.so.0 (Pillow's RAQM
#   layout loads it at run time; the image may not have it).
#
# lancedb's and pylance's wheels are 75 + 85 MB (185 + 225 MB of native library installed), over the
# 64 MiB a call may carry with the working tree, and still ~41 + ~50 MB as xz archives of their installed
# files. So the set travels in two parts, one per call, back to back on the same warm machine (it keeps
# its files for 30 s after a call; gpu_check.sh installs each part into .gpu-site/, which stays):
#   .whl/a: the small wheels, lancedb's files (lancedb-site.tar.xz), the font, libfribidi   (~53 MB)
#   .whl/b: pylance's files (pylance-site.tar.xz)                                           (~50 MB)
# vLLM cannot travel at all (gpu_check.py's VLLM_WHY_NOT says why).
#
#     bash benchmarks/gpu_wheels.sh                # ~160 MB of downloads; xz takes ~10-30 minutes on 2 busy cores
#     bash benchmarks/gpu_wheels.sh --report-only  # only rewrite benchmarks/results/gpu_wheels.md from .whl/
#
# Writes benchmarks/results/gpu_wheels.md: every file of each part and the parts' sizes.
#
# Needs: a python with pip and the project installed (the deepspeed build imports torch): $PYTHON or
# `python`; the system font /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf; xz.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
dest=.whl
font=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
limit_mib=60  # of the 64 MiB a device call carries: the working tree needs the rest

report() {
  local out=benchmarks/results/gpu_wheels.md
  {
    echo "# What \`benchmarks/gpu_wheels.sh\` fills \`.whl/\` with, at $(git rev-parse --short HEAD)"
    echo
    echo "Written by \`benchmarks/gpu_wheels.sh\` (each part travels in one device call, limit used: $limit_mib MiB)."
    echo
    echo "| part | file | bytes |"
    echo "|---|---|---:|"
    for part in a b; do
      (cd "$dest/$part" && find . -type f -printf '%P %s\n' | sort) | while read -r name size; do
        echo "| $part | \`$name\` | $size |"
      done
    done
    echo
    for part in a b; do
      total=$(du -sb "$dest/$part" | cut -f1)
      echo "- part $part: $total bytes ($(( total / 1048576 )) MiB)"
    done
  } > "$out"
  echo "wrote $out"
}
if [ "${1:-}" = "--report-only" ]; then
  report
  exit 0
fi

rm -rf "$dest"
mkdir -p "$dest/a/lib" "$dest/b"
scratch=$(mktemp -d /tmp/gpu-wheels.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64)

"$py" -m pip download -q --no-deps "${platform[@]}" -d "$dest/a" \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31 peft==0.21.2 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 omegaconf==2.4.0 \
  deprecation==2.1.0 overrides==7.7.0 lance-namespace==0.13.0 lance-namespace-urllib3-client==0.13.0

# deepspeed: no wheel on PyPI; DS_BUILD_OPS=0 makes a py3-none-any wheel (ops JIT-build if ever needed)
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$dest/a" deepspeed==0.19.8

# a wheel's files unpacked are what `pip install --target` leaves: archive them, x86 filter + LZMA2 -9e,
# both at once (xz is the slow part: minutes per archive)
pids=()
for spec in lancedb==0.40.0:a:lancedb pylance==14.0.2:b:pylance; do
  IFS=: read -r req part name <<< "$spec"
  "$py" -m pip download -q --no-deps "${platform[@]}" -d "$scratch/$name" "$req"
  mkdir -p "$scratch/$name-site"
  "$py" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$scratch/$name"/*.whl "$scratch/$name-site"
  (tar -C "$scratch/$name-site" -cf - . | xz --x86 --lzma2=preset=9e -T1 > "$dest/$part/$name-site.tar.xz") &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# the emoji font, cut to the glyphs the vocabulary can draw, and checked to render the same pixels
PYTHONPATH="$PWD" "$py" - "$font" "$dest/a/NotoColorEmoji-subset.ttf" <<'EOF'
import sys

import numpy as np
from fontTools import subset

from cycle.data.emoji.render import GlyphCache
from cycle.data.emoji.vocab import candidates

full, out = sys.argv[1], sys.argv[2]
objects = candidates()
opts = subset.Options()
opts.layout_features = ["*"]  # keep the ligatures that draw ZWJ sequences as one glyph
font = subset.load_font(full, opts)
subsetter = subset.Subsetter(opts)
subsetter.populate(text="".join(o.emoji for o in objects))
subsetter.subset(font)
subset.save_font(font, out, opts)
a, b = GlyphCache(full), GlyphCache(out)
bad = [o.name for o in objects if not np.array_equal(np.asarray(a.base(o.emoji)), np.asarray(b.base(o.emoji)))]
if bad:
    sys.exit(f"the cut font draws {len(bad)} glyphs differently, e.g. {bad[:3]}")
print(f"font: {len(objects)} glyphs, identical renders")
EOF
cp -L /lib/x86_64-linux-gnu/libfribidi.so.0 "$dest/a/lib/"

ls -la "$dest"/a "$dest"/a/lib "$dest"/b
for part in a b; do
  total=$(du -sb "$dest/$part" | cut -f1)
  echo "part $part: $(( total / 1048576 )) MiB (each call carries one part; limit used here: $limit_mib MiB)"
  if [ "$total" -gt $(( limit_mib * 1048576 )) ]; then
    echo "error: $dest/$part is over $limit_mib MiB: it would not travel with the working tree" >&2
    exit 1
  fi
done
report
