#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md and docs/groups.md in one time-boxed session.
#
# A lent GPU machine is scarce (minutes per session), so every step has its own time limit and
# writes its results under $OUT as soon as it ends; a step that runs out of time loses only itself.
# The whole script stays under 9 minutes (one call of the device tool).
#
#   1. Lie-group training throughput, eager bf16, paper setting (width 40, N = 10, batch 128):
#      plain CNN, full-kernel and separable group networks, the separable one with each
#      GroupLayerNorm implementation (split reduction / F.layer_norm), same run.
#   2. Reproduction 2 with the paper's protocol (sample sets redrawn every step, width 40, N = 10,
#      batch 128, bf16): plain CNN and SL(2) with anti-aliased pooling, fitted stencils and the
#      invariant max over a 4x interpolant (the shipped recipe), the same number of steps, sized
#      from step 1 to fit STEP2_S seconds; test-time Monte-Carlo averaging, the hard regime's
#      components; then the SL(2) weights evaluated with 16 samples.
#   3. `surgery apply` + `surgery finetune --device cuda --amp` + `surgery eval` on affine digits:
#      the command-line training path on a GPU (SL(2) recipe, 10 epochs).
#   4. Step 1 with torch.compile (plain and separable).
#
# Comes back under $OUT: session.log, the JSON results of each step, weights.tgz (step 2's
# trained models as safetensors, for `reproduce_affine.py --load` on a CPU).
#
# Usage (repo root, on the GPU machine):  OUT=out/gpu bash bench/gpu_session.sh
# The lent machines have torch, timm and scikit-learn but not lark or bcos: carry their wheels
# (`pip download --no-deps ... -d .whl lark bcos`, see the device README) and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
# Dry run on a CPU (tiny sizes, same code paths):
#   OUT=/tmp/gpu-dry DEVICE=cpu WIDTH=8 SAMPLES=4 BATCH=8 STEPS=20 FT_EPOCHS=1 N16_S=600 bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-40}
SAMPLES=${SAMPLES:-10}
BATCH=${BATCH:-128}
STEP2_S=${STEP2_S:-200}
FT_EPOCHS=${FT_EPOCHS:-10}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
start=$SECONDS
stamp() { echo "== $1 (t = $((SECONDS - start)) s)"; }
amp=(--amp)
[ "$DEVICE" = cpu ] && amp=()

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
group_net=(--device "$DEVICE" --width "$WIDTH" --samples "$SAMPLES" --batch "$BATCH" "${amp[@]}")

stamp "1. group speed, eager"
timeout 100 python3 bench/groups_speed.py "${group_net[@]}" --norm-impls split native --steps 10 \
  --rounds 5 --warmup 3 --json "$OUT/groups_speed_eager.json"

# optimizer steps for step 2 (same for every model), and the time limits of its two runs
read -r steps limit_plain limit_group < <(python3 - "$OUT/groups_speed_eager.json" "$STEP2_S" "${STEPS:-}" <<'PY'
import json, sys
try:
    if sys.argv[3]:  # STEPS given: no sizing (dry runs)
        raise ValueError
    t = json.load(open(sys.argv[1]))["median_s"]
    # blurmax pooling and the fitted stencils (K = 7-11 instead of 5) cost more than step 1's net
    plain, group = t["plain"], 1.4 * t["group-sep/split"]
    steps = int(min(12000, max(1000, float(sys.argv[2]) / (plain + group))))
except Exception:
    steps, plain, group = int(sys.argv[3] or 1000), 0.5, 3.0  # generous: dry runs measure everything on a CPU
print(steps, int(1.3 * steps * plain + 30), int(1.3 * steps * group + 90))
PY
)
mkdir -p "$OUT/weights"
stamp "2. reproduction 2: $steps steps, samples redrawn every step"
# plain CNN and SL(2) as the shipped recipe builds it; then the same SL(2) weights evaluated with
# 16 samples (a 16-angle grid) at test time, which raised the CPU proxy's hard-regime accuracy
step2=("${group_net[@]}" --steps "$steps" --warmup 100 --resample train --copies 4 --spatial-pool blurmax
  --stencil fit --max-upsample 4 --components --tag "gpu blurmax fit up4")
timeout $((limit_plain + limit_group)) python3 bench/reproduce_affine.py "${step2[@]}" --models plain sl2 \
  --mc 8 --mc-recal 512 --json "$OUT/affine_digits_gpu.json" --save "$OUT/weights/ck"
timeout "${N16_S:-120}" python3 bench/reproduce_affine.py "${step2[@]}" --models sl2 --samples 16 \
  --load "$OUT/weights/ck" --probes 1 --consistency-digits 32 --json "$OUT/affine_digits_gpu_n16.json"
# trained weights in one file (at most 8 files come back from the machine), for CPU analysis
tar -czf "$OUT/weights.tgz" -C "$OUT/weights" . && rm -r "$OUT/weights"

stamp "3. surgery apply + finetune + eval on the GPU"
# a function run under `timeout` (exported with its variables), not a quoted `bash -c` string
finetune_step() {
  surgery apply "$FT/sl2.recipe" "surgery.groups.models:plain_cnn?width=$WIDTH&pool_norm=true" -o "$FT/sl2" \
    --input-size 1x40x40 -f json > "$FT/apply.json" &&
  surgery finetune "$FT/sl2" --data "affine_digits()" --epochs "$FT_EPOCHS" --batch-size "$BATCH" --lr 2e-3 \
    --device "$DEVICE" ${AMP_FLAG:+"$AMP_FLAG"} --no-progress -o "$FT/sl2-ft" &&
  cp "$FT/sl2-ft.run/metrics.jsonl" "$OUT/finetune_metrics.jsonl" &&
  for r in none mild hard; do
    surgery eval "$FT/sl2-ft" --data "affine_digits(regime='$r', copies=4)" --split test -f json
  done > "$OUT/finetune_eval.json"
}
FT=$(mktemp -d)
AMP_FLAG=${amp[0]:-}
sed -e 's/GL+(2)/SL(2)/' -e 's/GroupConv(group=G,/GroupConv(group=G, separable=true,/' \
  recipes/affine-equivariant.recipe > "$FT/sl2.recipe"
export -f finetune_step
export FT AMP_FLAG OUT WIDTH BATCH DEVICE FT_EPOCHS
timeout 150 bash -c finetune_step

stamp "4. group speed, compiled"
timeout 150 python3 bench/groups_speed.py "${group_net[@]}" --skip-full --compile --steps 10 \
  --rounds 5 --warmup 3 --json "$OUT/groups_speed_compiled.json"
stamp "done"
