#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md and docs/groups.md in one time-boxed session.
#
# A lent GPU machine is scarce (minutes per session), so every step has its own time limit and
# writes its results under $OUT as soon as it ends; a step that runs out of time loses only itself.
#
#   1. Lie-group training throughput, eager bf16, paper setting (width 40, N = 10, batch 128):
#      plain CNN vs full-kernel vs separable group network, same run.
#   2. Reproduction 2 with the paper's protocol: sample sets redrawn every training step, width 40,
#      N = 10, batch 128, bf16; plain CNN, SL(2), GL+(2) (separable; with test-time Monte-Carlo
#      averaging), SL(2) with anti-aliased pooling, then GL+(2) with full kernels, all for the same
#      number of steps, sized from step 1's timings to fit STEP2_S seconds.
#   3. B-cos train-step speed and memory, eager bf16: standard / ours / official, ResNet-50 and ViT-S.
#   4. Step 1 with torch.compile (plain and separable).
#
# Comes back under $OUT: session.log, the JSON results of each step, weights.tgz (step 2's
# trained models, for `reproduce_affine.py --load` on a CPU).
#
# Usage (repo root, on the GPU machine):  OUT=out/gpu bash bench/gpu_session.sh
# The lent machines have torch, timm and scikit-learn but not lark or bcos: carry their wheels
# (`pip download --no-deps ... -d .whl lark bcos`, see the device README) and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
# Dry run on a CPU (tiny sizes, same code paths):
#   OUT=/tmp/gpu-dry DEVICE=cpu WIDTH=8 SAMPLES=4 BATCH=8 STEPS=20 BCOS_BATCH=2 BCOS_SIZE=64 \
#     bash bench/gpu_session.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
DEVICE=${DEVICE:-cuda}
WIDTH=${WIDTH:-40}
SAMPLES=${SAMPLES:-10}
BATCH=${BATCH:-128}
STEP2_S=${STEP2_S:-200}
BCOS_BATCH=${BCOS_BATCH:-128}
BCOS_SIZE=${BCOS_SIZE:-224}
mkdir -p "$OUT"
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
timeout 100 python3 bench/groups_speed.py "${group_net[@]}" --steps 10 --rounds 5 --warmup 3 \
  --json "$OUT/groups_speed_eager.json"

# optimizer steps for step 2 (same for every model), and each process's time limit
read -r steps limit_sep limit_full < <(python3 - "$OUT/groups_speed_eager.json" "$STEP2_S" "${STEPS:-}" <<'EOF'
import json, sys
try:
    if sys.argv[3]:  # STEPS given: no sizing (dry runs)
        raise ValueError
    t = json.load(open(sys.argv[1]))["median_s"]
    steps = int(min(8000, max(500, float(sys.argv[2]) / (t["plain"] + 3 * t["group-sep"] + t["group-full"]))))
    sep, full = steps * (t["plain"] + 2 * t["group-sep"]), steps * t["group-full"]
except Exception:
    steps, sep, full = int(sys.argv[3] or 1000), 120, 120
print(steps, int(1.5 * sep + 90), int(1.5 * full + 60))
EOF
)
mkdir -p "$OUT/weights"
repro=("${group_net[@]}" --steps "$steps" --warmup 100 --resample train --copies 4 \
  --json "$OUT/affine_digits_gpu.json" --save "$OUT/weights/ck")
stamp "2. reproduction 2: $steps steps, samples redrawn every step (limits $limit_sep s, $limit_full s)"
timeout "$limit_sep" python3 bench/reproduce_affine.py "${repro[@]}" --models plain sl2 gl2 --tag gpu \
  --mc 8 --mc-recal 512
timeout "$limit_full" python3 bench/reproduce_affine.py "${repro[@]}" --models sl2 --spatial-pool blurmax \
  --tag "gpu blurmax"
timeout "$limit_full" python3 bench/reproduce_affine.py "${repro[@]}" --models gl2 --no-separable \
  --tag "gpu full"

# trained weights in one file (at most 8 files come back from the machine): for analysis on a CPU
# later, e.g. --load with --mc, or the equivariance diagnostics of docs/groups.md
tar -czf "$OUT/weights.tgz" -C "$OUT/weights" . && rm -r "$OUT/weights"

stamp "3. B-cos speed, eager"
timeout 90 python3 bench/bcos_speed.py --device "$DEVICE" --archs resnet50 vit_s \
  --variants standard ours official --batch "$BCOS_BATCH" --size "$BCOS_SIZE" --rounds 5 --steps 3 \
  --json "$OUT/bcos_speed_gpu.json"

stamp "4. group speed, compiled"
timeout 120 python3 bench/groups_speed.py "${group_net[@]}" --skip-full --compile --steps 10 \
  --rounds 5 --warmup 3 --json "$OUT/groups_speed_compiled.json"
stamp "done"
