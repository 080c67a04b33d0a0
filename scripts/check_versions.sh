#!/usr/bin/env bash
# Run attnctrl's identity and parity tests against other diffusers (and torch) releases, each in a fresh venv.
#
#   scripts/check_versions.sh                      # diffusers 0.40.0 0.41.0 0.42.1 with torch 2.13.0
#   DIFFUSERS="0.41.0" TORCH=2.14.1 scripts/check_versions.sh
#
# attnctrl itself is installed without its pins (--no-deps), its other requirements as pyproject lists them. One
# line per version goes to stdout and to $WORK/versions.log: the version pair and pytest's summary. Set the ranges in
# pyproject.toml and README to what passed here.
set -uo pipefail
cd "$(dirname "$0")/.."
DIFFUSERS=${DIFFUSERS:-"0.40.0 0.41.0 0.42.1"}
TORCH=${TORCH:-2.13.0}
WORK=${WORK:-/tmp/attnctrl-versions}
TESTS=(tests/core tests/kernels tests/test_attention_backend.py tests/test_compile.py tests/test_agent.py
       tests/test_freecustom.py tests/test_irdiffusion.py tests/test_magicface.py tests/test_clora.py
       tests/test_primecomposer.py tests/test_ditctrl.py tests/test_clear.py tests/test_attention_maps.py
       tests/test_pipelines.py tests/test_shared_pipeline.py)
DEPS=$(python3 - <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
print(" ".join(d for d in deps + dev if not re.match(r"(torch|diffusers|gradio|playwright)\b", d)))
PY
)
mkdir -p "$WORK"
for version in $DIFFUSERS; do
  venv="$WORK/diffusers-$version-torch-$TORCH"
  if [ ! -x "$venv/bin/python" ]; then
    { python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q --upgrade pip &&
      "$venv/bin/pip" install -q "torch==$TORCH" &&                # first: a bare torch requirement pulls CUDA
      "$venv/bin/pip" install -q "diffusers==$version" $DEPS &&
      "$venv/bin/pip" install -q --no-deps -e .; } > "$venv.install.log" 2>&1 ||
      { echo "diffusers $version, torch $TORCH: install failed (see $venv.install.log)" | tee -a "$WORK/versions.log"
        rm -rf "$venv"; continue; }
  fi
  summary=$(HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -1)
  echo "diffusers $version, torch $TORCH: $summary" | tee -a "$WORK/versions.log"
done
