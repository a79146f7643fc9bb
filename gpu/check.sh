#!/usr/bin/env bash
# The GPU check (gpu/README.md): on one GPU in at most 8 minutes, nothing from the network.
# Without a GPU it says so, runs the same steps on the CPU and exits 0.
#   bash gpu/check.sh                 (make gpu-check)
#   CHECK_PYTHON=python3 CHECK_TESTS='tests/test_decode.py' bash gpu/check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${CHECK_OUT:-runs/gpu-check}
WHEELS=gpu/wheels
# The machine's own PyTorch: the project's venv here, else the python3 that has torch.
if [ -n "${CHECK_PYTHON:-}" ]; then PY=$CHECK_PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
rm -rf "$OUT" && mkdir -p "$OUT/logs"
SUMMARY=()
SCALE=1  # the time limits are the GPU's; the CPU parts get CHECK_CPU_SCALE times them
START=$(date +%s)

# step NAME SECONDS COMMAND...: runs it under a time limit, output to $OUT/logs/NAME.log.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  echo "== $name (limit $(( limit * SCALE ))s): $*"
  timeout $(( limit * SCALE )) "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  tail -n 4 "$OUT/logs/$name.log" | sed -e 's/^/   | /' -e '$a\'
  if [ $rc -eq 0 ]; then SUMMARY+=("PASS  $name  ${took}s")
  elif [ $rc -eq 124 ]; then SUMMARY+=("FAIL  $name  ${took}s  (time limit; log: $OUT/logs/$name.log)")
  else SUMMARY+=("FAIL  $name  ${took}s  (exit $rc; log: $OUT/logs/$name.log)"); fi
  return $rc
}

# 1. Python packages: whatever is missing comes from the wheel folder, into a private folder.
MISSING=$($PY - <<'EOF'
import importlib.util
names = ["pydantic", "datasets", "trl", "gguf", "vaderSentiment", "afinn", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$MISSING" ]; then
  echo "== missing here: $MISSING"
  PACKAGES=$(shopt -s nullglob; echo $WHEELS/*.whl $WHEELS/*.tar.gz)
  if [ -z "$PACKAGES" ]; then
    echo "no wheel folder ($WHEELS): run 'make gpu-wheels' on a machine with the package index"
    exit 2
  fi
  SITE=$ROOT/$OUT/site
  step install-wheels 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-compile --no-cache-dir --target "$SITE" $PACKAGES || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 2. The tiny model: the prepared copy in the wheel folder when $RLHF_CACHE has none.
export RLHF_CACHE=${RLHF_CACHE:-$HOME/.cache/rlhf}
if [ ! -f "$RLHF_CACHE/tiny-llama/PREPARED.json" ] && [ -d "$WHEELS/rlhf-cache/tiny-llama" ]; then
  export RLHF_CACHE=$ROOT/$WHEELS/rlhf-cache
fi
[ -f "$RLHF_CACHE/smollm2-135m-instruct/PREPARED.json" ] || export RLHF_TEST_WITHOUT_SMOLLM2=1

# 3. Where it runs, with which versions.
$PY - <<'EOF' | tee "$OUT/environment.txt"
import importlib.metadata as md, platform, torch
cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(0) if cuda else f"no GPU found: CPU ({platform.processor() or platform.machine()})")
print("python:", platform.python_version(), " torch:", torch.__version__, " CUDA:", torch.version.cuda)
print("versions:", ", ".join(f"{n} {md.version(n)}" for n in
      ["transformers", "peft", "accelerate", "trl", "datasets", "pydantic"]))
EOF
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPU=1
  TESTS=${CHECK_TESTS:-tests/ppo tests/test_device_placement.py tests/test_decode.py tests/test_generate.py tests/test_precision.py tests/test_frozen_precision.py tests/test_sft.py tests/test_reward.py tests/test_dpo.py}
else
  GPU=0
  echo "NO GPU FOUND: torch.cuda.is_available() is False. Running the CPU parts only."
  SCALE=${CHECK_CPU_SCALE:-5}
  TESTS=${CHECK_TESTS:-tests/test_device_placement.py}
fi

# 4. The tests that take a device run on it (tests/conftest.py: device_under_test).
step tests 300 $PY -m pytest -q -p no:cacheprovider -m "not slow and not multiprocess" \
  --timeout 240 $TESTS

# 5. The stages on the tiny recipe in bf16, then GRPO on the same SFT and reward runs.
R=recipes/tiny.yaml
CLI=("$PY" -m rlhf.cli)
ARGS=(precision=bf16 output_dir=$OUT/tiny)
step sft 90 "${CLI[@]}" sft $R "${ARGS[@]}"
step reward 90 "${CLI[@]}" reward $R "${ARGS[@]}"
step judge 90 "${CLI[@]}" judge $R "${ARGS[@]}" --if-configured
step ppo-gae 120 "${CLI[@]}" ppo $R "${ARGS[@]}"
step ppo-grpo 120 "${CLI[@]}" ppo $R precision=bf16 output_dir=$OUT/tiny-grpo \
  ppo.sft_dir=$OUT/tiny/sft ppo.reward_dir=$OUT/tiny/reward \
  "eval.judges=[{model: $OUT/tiny/judge, name: judge}]" \
  ppo.estimator=grpo ppo.samples_per_prompt=2
step dpo 90 "${CLI[@]}" dpo $R "${ARGS[@]}"

# 6. One timed iteration, PPO and GRPO.
# The CPU parts time a smaller batch: the same code, in minutes rather than tens of them.
BENCH_SIZE=$([ $GPU -eq 1 ] && echo "--batch 16 --new-tokens 32" || echo "--batch 8 --new-tokens 8")
step bench-row 120 $PY gpu/bench_row.py --precision bf16 $BENCH_SIZE

# 7. The report.
{
  echo "== gpu/check.sh report ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START ))s in all)"
  cat "$OUT/environment.txt"
  printf '%s\n' "${SUMMARY[@]}"
  grep -h '^{"row"' "$OUT/logs/bench-row.log" 2>/dev/null
  [ $GPU -eq 1 ] || echo "NO GPU FOUND: the steps above ran on the CPU; the GPU check is still to do."
} | tee "$OUT/report.txt"
FAILED=$(printf '%s\n' "${SUMMARY[@]}" | grep -c '^FAIL')
[ $GPU -eq 0 ] && exit 0
[ "$FAILED" -eq 0 ]
