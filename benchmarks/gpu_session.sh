#!/usr/bin/env bash
# One lent-GPU call (the device tool's limit: 600 s per command). Items run in priority order, each
# under its own time limit (cut to what is left before DEADLINE_S, default 480 s, so the script ends
# well inside the 600 s); an item is skipped when fewer than 20 s are left.
#
# Everything comes back: each item writes under $WORK/<item>/ (its log, JSON and files), and after
# every item $WORK is packed into $OUT/results.tgz (a call returns at most 8 files; $OUT holds only
# session.log, results.tgz and, when under 15 MiB, jax_cache.tgz). Item commands use no git.
#
# Carried with the call (benchmarks/prepare_gpu_carry.sh builds both here):
#   .whl/      wheels the GPU image lacks (ml_collections; grain, portpicker and pyspng for the input
#              pipeline's worker processes and PNG decoder), installed into $WORK/site
#   .devcarry/ anchor_torch_deeplabv2.py (a copy of ../shared/bench/anchor_torch_deeplabv2.py), and
#              optionally jax_cache.tgz (a previous call's cache) and extra_items.txt (below)
#
# Extra items (the slot for items added later, e.g. a MiT-B5 step): the file $EXTRA_ITEMS (default
# .devcarry/extra_items.txt, when present) holds one item per line, "NAME LIMIT_S COMMAND...", run
# at the "extra items" point below, after the required items; '#' lines are ignored.
#
#   bash benchmarks/gpu_session.sh                       # the whole session
#   ONLY="step8 peer" bash benchmarks/gpu_session.sh     # some items (names: the `item` calls below)
#   DRY_RUN=1 bash benchmarks/gpu_session.sh             # every item sleeps its full limit (the worst case)
#
# JAX_PLATFORMS defaults to cuda: on the GPU nothing falls back to the CPU unnoticed, and elsewhere
# every JAX item fails at once. To run an item on a CPU set JAX_PLATFORMS=cpu, LIMIT_<item>=seconds
# and DEADLINE_S; ROUND_ARGS adds flags to the real-size round (reduced counts: docs/performance.md).
#
# Item budgets (required items: 90 + 50 + 50 + 180 + 80 = 450 s, plus ~15 s of set-up), planned
# from the H200 call of 2026-12-04 (issue 17): the torch anchor's three rows ran inside 75 s; our
# step item (two bf16 batch-8 variants, cold compiles included) inside 150 s; pseudo-labelling
# compiled for 27 s (flip) / 44 s (MST) before labelling at 36.0 / 13.7 img/s; the GPU-size
# synthetic round took 123 s, host-bound (now rendered once). The real-size round: ~15 s of
# fixtures on 15 processes, ~45 s compiling labelling and evaluation (MST + flip, shared programs),
# ~30 s the train step, 200 images labelled and 2 x 100 evaluated at ~14 img/s (~30 s), 200 steps
# of batch 2 (~10 s). Measured on a CPU (docs/performance.md): with every item taking its whole
# limit (DRY_RUN=1) the script ends at 475 s; run plainly there, each CUDA item fails in seconds.
set -u
START=$(date +%s); DEADLINE=$((START + ${DEADLINE_S:-480}))
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
OUT=${OUT:-/tmp/out}; KEEP_WORK=${WORK:-}; WORK=${WORK:-$(mktemp -d /tmp/gpu_session.XXXXXX)}
mkdir -p "$OUT" "$WORK/jax_cache"; LOG="$OUT/session.log"
export JAX_COMPILATION_CACHE_DIR=$WORK/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
[ -f .devcarry/jax_cache.tgz ] && tar -xzf .devcarry/jax_cache.tgz -C "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$WORK/site" .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$WORK/site:$PWD

log() { echo "$*" | tee -a "$LOG"; }
# results.tgz: every item's folder so far (a killed tar leaves the previous archive whole)
pack() {
    tar -czf "$OUT/results.part.tgz" -C "$WORK" --exclude=./jax_cache --exclude=./site --exclude='*.trace.json.gz' \
        --exclude='*.xplane.pb' . 2>/dev/null
    if [ "$(stat -c %s "$OUT/results.part.tgz")" -gt 15000000 ]; then  # 16 MiB a file: leave the HLO dumps out
        tar -czf "$OUT/results.part.tgz" -C "$WORK" --exclude=./jax_cache --exclude=./site --exclude='*.trace.json.gz' \
            --exclude='*.xplane.pb' --exclude='hlo_*' . 2>/dev/null
    fi
    mv -f "$OUT/results.part.tgz" "$OUT/results.tgz"
}
# item NAME LIMIT_S COMMAND...: runs COMMAND with OUT=$WORK/NAME under min(LIMIT_S (or $LIMIT_NAME), time
# left - 5 s); skipped when fewer than 20 s are left or ONLY does not name it. Output goes to
# $WORK/NAME/log; its JSON, FAIL and error lines also to session.log. ITEM is the item's folder.
item() {
    local name=$1 limit=$2; shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    local override="LIMIT_$name"; limit=${!override:-$limit}
    local left=$((DEADLINE - $(date +%s) - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then log "== $name: skipped, ${left}s left"; return 0; fi
    export ITEM="$WORK/$name"; mkdir -p "$ITEM"
    log "== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s${DRY_RUN:+, dry run: sleeps its limit}): $*"
    local t0; t0=$(date +%s)
    if [ -n "${DRY_RUN:-}" ]; then
        sleep "$limit"
    else
        OUT="$ITEM" timeout -k 5 "$limit" "$@" > "$ITEM/log" 2>&1
    fi
    local rc=$?
    grep -E '^\{|^FAIL|^error' "$ITEM/log" 2>/dev/null | cut -c1-1500 | tee -a "$LOG"
    [ "$rc" -ne 0 ] && { log "   $name: exit $rc"; tail -c 1500 "$ITEM/log" >> "$LOG" 2>/dev/null; }
    log "   $name: $(( $(date +%s) - t0 ))s"
    pack
    return 0
}

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,memory.used \
    --format=csv; nproc; free -g | head -2
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, jax.devices())"
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee -a "$LOG"

# 1. our step and the peer's, same card, same call: batch 8 (space_to_batch, frozen BN folded and
#    not: what folding buys), then the PyTorch peer at batch 8 and 2 (frozen BN, and training BN),
#    then our batch 2 (the CRST recipe's batch)
item step8 90 python3 -m benchmarks.bench_train_step --configs 8:bfloat16 --atrous space_to_batch --fold on,off \
    --loss upsample --steps 10 --rounds 2 --warmup 2 --save-hlo "$WORK/step8/hlo"
item peer 50 python3 -m benchmarks.peer_step .devcarry/anchor_torch_deeplabv2.py
item step2 50 python3 -m benchmarks.bench_train_step --configs 2:bfloat16 --atrous space_to_batch --fold on \
    --loss upsample --steps 10 --rounds 2 --warmup 2
# 2. a whole CRST round at real size with the accelerator defaults (its labelling is the
#    pseudo-labelling img/s of MST + flip at 1024x2048, through the round loop)
item real_size_round 180 python3 -m benchmarks.real_size_round --step-bench "$WORK/step2/bench_jax.json" ${ROUND_ARGS:-}
# 3. the GPU-size synthetic round (source-only + one CBST round), the pair rendered once per run
item synthetic 80 python3 -m benchmarks.synthetic_round -- --config=gpu --config.methods=source_only,cbst \
    --config.synthetic.num_source=1000 --config.synthetic.num_target_train=200 \
    --config.synthetic.num_target_val=200 --config.source_training.steps=300 --config.self_training.rounds=1 \
    --config.self_training.steps_per_round=100 --config.input.workers=12
# 4. extra items ($EXTRA_ITEMS, default .devcarry/extra_items.txt): "NAME LIMIT_S COMMAND..." per line
EXTRA_ITEMS=${EXTRA_ITEMS:-.devcarry/extra_items.txt}
if [ -f "$EXTRA_ITEMS" ]; then
    while read -r name limit command; do
        case "$name" in ''|'#'*) continue ;; esac
        eval "item \"\$name\" \"\$limit\" $command" < /dev/null
    done < "$EXTRA_ITEMS"
fi
# 5. the transformer network of today's recipes (issue 20): a DAFormer MiT-B5 train step at 512x512
#    (batch 4 = DAFormer's 2 source + 2 target, and 2; AdamW) and one forward at 1024x2048
item mit_step 75 python3 -m benchmarks.bench_train_step --model daformer_mit_b5 --size 512,512 \
    --configs 4:bfloat16,2:bfloat16 --atrous dilated --optimizer adam --steps 10 --rounds 2 --warmup 2
item mit_forward 45 python3 -m benchmarks.bench_train_step --step forward --model daformer_mit_b5 --size 1024,2048 \
    --configs 1:bfloat16 --atrous dilated --steps 5
# 6. as time allows: pseudo-labelling alone (flip, and MST + flip, batch 2), batch 8 with dilated
#    convolutions, full-size float32 parity with torch, the host pipeline on this machine's cores
item pseudo_label 90 python3 -m benchmarks.bench_pseudo_label --images 16 --batch 2 --configs single,mst
item step8_dilated 60 python3 -m benchmarks.bench_train_step --configs 8:bfloat16 --atrous dilated --fold on \
    --loss upsample --steps 10 --rounds 2 --warmup 2
item parity 60 python3 -m benchmarks.check_parity_gpu
item pipeline 45 python3 -m benchmarks.bench_pipeline --old-ref "" --workers 4,15 --images 3 --rounds 8
# 7. as time allows (issue 21): the online teacher-student step, MiT-B5 at 512x512, 2 source + 2
#    target crops, bf16, both threshold policies timed in interleaved rounds (compile s, ms/step,
#    img/s, the GPU program's FLOPs and memory); the offline step of the same network is mit_step's
#    batch-4 row. Cut to the time left like every item: skipped when the items above take their limits
item online_step 120 python3 -m benchmarks.bench_online_step --model daformer_mit_b5 --size 512,512 --batch 2 \
    --dtype bfloat16 --policy fixed,class_balanced --window 8 --fd off --offline off --steps 10 --rounds 2 --warmup 2

du -sh "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | tee -a "$LOG"
tar -czf "$WORK/jax_cache.tgz" -C "$JAX_COMPILATION_CACHE_DIR" . 2>/dev/null \
    && [ "$(stat -c %s "$WORK/jax_cache.tgz")" -lt 15000000 ] && cp "$WORK/jax_cache.tgz" "$OUT/"
log "== done at t=$(( $(date +%s) - START ))s"; date -u | tee -a "$LOG"
[ -z "$KEEP_WORK" ] && rm -rf "$WORK"  # everything is in $OUT (a WORK given by the caller stays)
exit 0
