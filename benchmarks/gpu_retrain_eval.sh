#!/usr/bin/env bash
# Train BlindDiff-S and the regression baseline for the same number of steps, then evaluate both on
# Set5/Set14-Gaussian8 (evaluation processes share the GPU; their results are merged) and compare the new BlindDiff
# model with the one it started from on held-out train-hr crops. Meant for a lent GPU machine that receives only
# the repository; on your own machine run it as is.
#
#   python benchmarks/make_device_data.py --init bd=src/blindsr/weights/blinddiff_s.safetensors \
#       --init reg=benchmarks/weights/regression_s.safetensors        # once: .device-data/ (~60 MiB), git-ignored
#   bash benchmarks/gpu_retrain_eval.sh [OUT_DIR]
#
# Defaults = session 3's run: stage 3 of BlindDiff-S (configs/blinddiff_s_stage3.yaml, from the fp16 copy of the
# stage-2 weights) and the regression baseline continued from its 1,351-step weights, 2,000 more steps each.
# From scratch instead (session 2's plan): BD_CONFIG=configs/blinddiff_s.yaml BD_INIT= REG_INIT= STEPS=4000 \
#   MINUTES=17 BD_EXTRA="--set diffusion.prediction=v --set diffusion.lam_ref_steps=null" bash ...
# Smoke test on a CPU: DEVICE=cpu STEPS=2 HELDOUT_IMAGES=1 DATA=<tiny copy> BD_EXTRA/REG_EXTRA="--set data.crop=32 ...".
# The tracked weights exceed a 64 MiB transfer limit beside .device-data: leave the .safetensors files out of the
# transfer there (git rm --cached; this run makes new ones). Detached: setsid nohup bash benchmarks/... &
set -u
OUT_DIR=${1:-/tmp/runs}; mkdir -p "$OUT_DIR"; R=$OUT_DIR
D=${DATA:-$PWD/.device-data}
BD_CONFIG=${BD_CONFIG:-configs/blinddiff_s_stage3.yaml}
BD_INIT=${BD_INIT-$D/init/bd.safetensors}
REG_INIT=${REG_INIT-$D/init/reg.safetensors}
DEV=${DEVICE:-cuda}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
export BLINDSR_GIT_COMMIT=${BLINDSR_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# The same budget and recipe for both (lr 3e-4, EMA warm-up), held-out validation every 1000 steps, a safety limit.
NEXT=(--set train.max_steps=${STEPS:-2000} --set train.time_limit_min=${MINUTES:-11} --set train.val_every=1000
      --set train.ema_warmup=true --set optim.lr=3e-4)
BD_ARGS=(); [ -n "$BD_INIT" ] && BD_ARGS=(--set train.init_from="$BD_INIT")
REG_ARGS=(); [ -n "$REG_INIT" ] && REG_ARGS=(--set train.init_from="$REG_INIT")
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
python -c "import torch; print('torch', torch.__version__)"
python -m blindsr train blinddiff --config "$BD_CONFIG" --output "$R/bd" --set data.root="$D/train-hr" \
    "${NEXT[@]}" "${BD_ARGS[@]}" ${BD_EXTRA:-} --no-progress --device "$DEV" > "$R/bd_train.log" 2>&1 &
python -m blindsr train regression --config configs/regression_s.yaml --output "$R/reg" \
    --set data.root="$D/train-hr" "${NEXT[@]}" "${REG_ARGS[@]}" ${REG_EXTRA:-} --no-progress --device "$DEV" \
    > "$R/reg_train.log" 2>&1 &
wait
echo "training done after $(( $(date +%s) - START )) s"; tail -n 3 "$R/bd_train.log" "$R/reg_train.log"
(cd "$R" && tar czf logs.tgz bd_train.log reg_train.log bd/log.csv bd/val.csv bd/config.yaml bd/meta.json \
    bd/losses.png reg/log.csv reg/val.csv reg/config.yaml reg/meta.json reg/losses.png)
touch "$R/train.done"
# Held-out check (train-hr's 9 held-out images, 128x128 centre crops): the new model against its starting point,
# over samplers and step counts; the best (sampler, steps) there, at lambda 0 or 1, is used for the test sets.
H=(python benchmarks/diagnose_blinddiff.py --images "${HELDOUT_IMAGES:-9}" --device "$DEV"
   --reg-ckpt "$R/reg/final.safetensors" --config "$BD_CONFIG" --set data.root="$D/train-hr")
[ -n "$BD_INIT" ] && "${H[@]}" --ckpt "$BD_INIT" --json "$R/heldout_init.json" \
    --variants ddpm:0:20:1 ddpm:1:20:1 ddpm:0:5:1 ddpm:1:5:1 ddpm:0:2:1 ddpm:1:2:1 > "$R/heldout_init.log" 2>&1 &
"${H[@]}" --ckpt "$R/bd/final.safetensors" --json "$R/heldout_new.json" --variants ddpm:0:20:1 ddpm:1:20:1 \
    ddpm:0:10:1 ddpm:1:10:1 ddpm:0:5:1 ddpm:1:5:1 ddpm:0:3:1 ddpm:1:3:1 ddpm:0:2:1 ddpm:1:2:1 ddim:0:10:1 \
    ddim:0:5:1 > "$R/heldout_new.log" 2>&1
read -r SAMPLER NSTEPS < <(python - "$R/heldout_new.json" <<'PY'
import json, re, sys
best = {}
for row, v in json.load(open(sys.argv[1])).items():
    m = re.match(r"(\w+), λ=\S+ \S+, (\d+) steps", row)
    if m:
        best[m.groups()] = max(v, best.get(m.groups(), -1.0))
print(*max(best, key=best.get))
PY
)
echo "held-out choice: sampler ${SAMPLER:=ddpm}, ${NSTEPS:=20} steps"
E=(python benchmarks/eval_gaussian8.py --ckpt "$R/bd/final.safetensors" --reg-ckpt "$R/reg/final.safetensors"
   --data "$D" --sampler "$SAMPLER" --steps "$NSTEPS" --device "$DEV")
# Memory (H100, Set14, guided rows backpropagate through the network): about 10 GB per kernel in a batch, so four
# processes at 8 or 4 kernels per batch ran out of memory; two rounds of two fit (chunking changes results only by
# float rounding).
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
"${E[@]}" --sets Set14 --variants "λ=0" --chunk 8 --json "$R/e_s14a.json" > "$R/e_s14a.log" 2>&1 &
"${E[@]}" --sets Set5 --variants "λ=0" "official rule" "bicubic-based" --chunk 2 --json "$R/e_set5.json" \
    > "$R/e_set5.log" 2>&1 &
wait
"${E[@]}" --sets Set14 --variants "official rule" --chunk 2 --json "$R/e_s14b.json" > "$R/e_s14b.log" 2>&1 &
"${E[@]}" --sets Set14 --variants "bicubic-based" --chunk 2 --json "$R/e_s14d.json" > "$R/e_s14d.log" 2>&1 &
wait
python benchmarks/eval_gaussian8.py --merge "$R"/e_set5.json "$R"/e_s14{a,b,d}.json \
    --json "$R/results.json" --md "$R/results.md" > "$R/merge.log" 2>&1
echo "all done after $(( $(date +%s) - START )) s"
touch "$R/all.done"
