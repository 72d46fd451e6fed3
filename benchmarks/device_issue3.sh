#!/usr/bin/env bash
# Issue 3 on one GPU, in one device call (about 9 minutes): training throughput (reference vs
# fast path, same process) then time to accuracy (ASCL, ResNet-18, CIFAR-10 copy), results and
# the trained encoder written to $OUT (8 files, each < 16 MiB).
#
# Device call (the lead copies ../shared/data/cifar10/train.tar.gz to data/cifar10/ first):
#   run(command="bash benchmarks/device_issue3.sh", carry=["data/cifar10"], timeout_s=600)
# CPU smoke test (what tests/test_benchmarks_train.py runs):
#   TINY=1 PYTHON=.venv/bin/python OUT=/tmp/issue3 bash benchmarks/device_issue3.sh
#
# First the GPU tests: no host sync; compiled networks' gradients equal eager ones (if not,
# everything runs with --no-compile). Afterwards, if 110 s are left, throughput at batch 1024.
# Knobs (environment): BUDGET_S (whole script, default 560), EPOCHS (cap, default 200),
# BATCH (512), LR_PER_256 (0.06: lr = 0.12 at batch 512), KNN_EVERY (20), PROBE_EPOCHS (100),
# FAST_PATH (auto|off), COMPILE (1|0), TAR (data/cifar10/train.tar.gz).
# If 200 epochs do not fit in what is left after the throughput run, the epoch count is cut
# to what fits (measured pairs/s) and the 200-epoch estimate is printed.
set -uo pipefail
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

TINY=${TINY:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/test-output/device_issue3}
TAR=${TAR:-data/cifar10/train.tar.gz}
BUDGET_S=${BUDGET_S:-560}
EPOCHS=${EPOCHS:-200}
BATCH=${BATCH:-512}
LR_PER_256=${LR_PER_256:-0.06}
KNN_EVERY=${KNN_EVERY:-20}
PROBE_EPOCHS=${PROBE_EPOCHS:-100}
FAST_PATH=${FAST_PATH:-auto}
COMPILE=${COMPILE:-1}
WORK=$(mktemp -d /tmp/issue3.XXXXXX)
export PYTHONUNBUFFERED=1 ASCL_CACHE=${ASCL_CACHE:-$WORK/cache} MPLBACKEND=Agg
mkdir -p "$OUT"

has_ascl() { "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('ascl.training') is None)" 2>/dev/null; }
if ! has_ascl; then
  # editable: the checkout's ascl/ (first on sys.path for -c and -m) keeps working with ascl.training -> training/
  echo "[$(elapsed)s] installing ascl-hub (editable, no deps, offline)"
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || true
  if ! has_ascl; then
    echo "pip install failed; linking the package folders into ascl/ of this (device) copy instead"
    for sub in training export serving demo model_cards; do [ -d "$sub" ] && ln -sfn "../$sub" "ascl/$sub"; done
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # benchmarks/*.py do not have the cwd on sys.path
  fi
fi
"$PY" -c "import torch, torchvision, ascl.training.fast, ascl.hub_weights
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" \
  || { echo "cannot import ascl"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

if [ "$TINY" != 1 ]; then  # GPU-only checks, ~1-2 min; the run goes on whatever they say
  echo "[$(elapsed)s] pytest -m gpu: no host sync in the fast path"
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py -k no_host_sync 2>&1 | tail -15
  if [ "$COMPILE" = 1 ]; then
    echo "[$(elapsed)s] pytest -m gpu: compiled networks give the eager gradients"
    if ! "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fast_path.py -k compiled_trunks_match 2>&1 | tail -15; then
      echo "COMPILED GRADIENTS DIFFER FROM EAGER: running everything with --no-compile"; COMPILE=0
    fi
  fi
fi
NOCOMPILE=(); [ "$COMPILE" = 0 ] && NOCOMPILE=(--no-compile)
if [ "$TINY" = 1 ]; then
  TP_ARGS=(--device cpu --batch-size 8 --steps 1 --warmup 0 --data synthetic:32 --image-size 8 --workers 0
           --bn-splits 2 --queue-size 32 --no-compile)
  TTA_ARGS=(--device cpu --data digits --image-size 8 --subset 32 --batch-size 16 --bn-splits 2 --queue-size 32
            --knn-every 1 --knn-val-subset 40 --workers 0 --no-compile --linear-probe-epochs 1 --warmup-epochs 0)
  PAIRS_PER_EPOCH=32; EPOCHS=1; DATA_N=32
else
  if [ ! -f "$TAR" ]; then echo "missing $TAR: copy ../shared/data/cifar10/train.tar.gz there and carry data/cifar10"; exit 2; fi
  DATA="cifar10-offline:$TAR"
  TP_ARGS=(--batch-size "$BATCH" --steps 40 --warmup 15 --data "$DATA" --workers 14 "${NOCOMPILE[@]}")
  TTA_ARGS=(--data "$DATA" --batch-size "$BATCH" --lr-per-256 "$LR_PER_256" --knn-every "$KNN_EVERY"
            --linear-probe-epochs "$PROBE_EPOCHS" --fast-path "$FAST_PATH" --workers 14 "${NOCOMPILE[@]}")
  PAIRS_PER_EPOCH=$(( 45000 / BATCH * BATCH )); DATA_N=45000
fi

echo "[$(elapsed)s] train_throughput ${TP_ARGS[*]}"
"$PY" benchmarks/train_throughput.py "${TP_ARGS[@]}" --out "$WORK/train_throughput.json"
TP_RC=$?

# Epochs that fit: what is left minus fixed costs (start-up and compile ~60 s, kNN monitors,
# linear probe, saving ~60 s), at 85% of the fast path's measured end-to-end pairs/s.
PLAN=$("$PY" - "$WORK/train_throughput.json" "$BUDGET_S" "$(elapsed)" "$EPOCHS" "$PAIRS_PER_EPOCH" "$TINY" <<'EOF'
import json, sys
path, budget, used, cap, per_epoch, tiny = sys.argv[1], *map(float, sys.argv[2:])
try:
    pairs = json.load(open(path))["results"]["fast"]["pairs_per_s"]
except (OSError, KeyError, ValueError):
    pairs = 20000.0  # throughput run failed: plan conservatively
left = budget - used - 120
fit = int(left * 0.85 * pairs / per_epoch)
epochs = int(cap) if tiny else max(1, min(int(cap), fit))
print(epochs, pairs, round(200 * per_epoch / (0.85 * pairs)))
EOF
)
read -r RUN_EPOCHS FAST_PAIRS EST200 <<<"$PLAN"
echo "[$(elapsed)s] fast path ${FAST_PAIRS} pairs/s -> 200 epochs would take ~${EST200} s of training; running ${RUN_EPOCHS} epochs"

echo "[$(elapsed)s] time_to_accuracy --epochs $RUN_EPOCHS ${TTA_ARGS[*]}"
"$PY" benchmarks/time_to_accuracy.py --epochs "$RUN_EPOCHS" "${TTA_ARGS[@]}" --out-dir "$WORK" --tag run \
  --encoder-out "$OUT/encoder" --max-shard-size 15MB
TTA_RC=$?

# Throughput at batch 1024 too, when the time left allows (one more compile, ~90 s in all).
TP2_RC=skipped
if [ "$TINY" != 1 ] && [ $(( BUDGET_S - $(elapsed) )) -gt 110 ]; then
  echo "[$(elapsed)s] train_throughput at batch 1024"
  "$PY" benchmarks/train_throughput.py --batch-size 1024 --steps 30 --warmup 10 --data "$DATA" --workers 14 \
    "${NOCOMPILE[@]}" --out "$WORK/train_throughput_1024.json"
  TP2_RC=$?
fi

# One results file (the $OUT file limit is 8: results, curve, 6 encoder files).
"$PY" - "$WORK" "$OUT" "$EST200" "$DATA_N" <<'EOF'
import json, shutil, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
merged = {"issue": 3, "estimated_train_seconds_200_epochs": float(sys.argv[3]), "train_images": int(sys.argv[4])}
for name, file in (("train_throughput", "train_throughput.json"), ("time_to_accuracy", "time_to_accuracy_run.json"),
                   ("train_throughput_1024", "train_throughput_1024.json")):
    p = work / file
    merged[name] = json.loads(p.read_text()) if p.is_file() else None
(out / "results_issue3.json").write_text(json.dumps(merged, indent=2) + "\n")
png = work / "time_to_accuracy_run.png"
if png.is_file():
    shutil.copyfile(png, out / "time_to_accuracy.png")
EOF
echo "[$(elapsed)s] done (throughput rc=$TP_RC, time_to_accuracy rc=$TTA_RC, throughput@1024 rc=$TP2_RC); files in $OUT:"
find "$OUT" -type f -printf '%P %s\n' | sort
rm -rf "$WORK"
[ "$TP_RC" = 0 ] && [ "$TTA_RC" = 0 ]
