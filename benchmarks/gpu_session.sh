#!/usr/bin/env bash
# One lent-GPU call (at most 600 s; this script keeps to DEADLINE_S, default 530 s): the PyTorch peer
# and our benchmarks in priority order, each under its own time limit (cut to what is left), every
# result written under $OUT as it finishes (JSON per benchmark in its own folder, session.log).
#
# Carried with the call: .whl/ (the ml_collections wheel, and any other wheel the image lacks) and
# .devcarry/ (anchor_torch_deeplabv2.py, a copy of ../shared/bench/anchor_torch_deeplabv2.py; and,
# if a previous call brought one back, jax_cache.tgz). jax's persistent compilation cache is on
# (/tmp/jax_cache): a program compiled once is loaded, not compiled, by every later item and rerun
# on the same machine, and the cache comes back as $OUT/jax_cache.tgz when it is small enough to
# be carried to the next call. Every Python script called here runs tiny on CPU in
# tests/test_benchmarks_smoke.py (their --smoke flags) first.
#
#   bash benchmarks/gpu_session.sh                 # the whole session
#   ONLY="anchor step" bash benchmarks/gpu_session.sh   # some items (names: see `item` calls below)
set -u
START=$(date +%s); DEADLINE=$((START + ${DEADLINE_S:-530}))
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"; LOG="$OUT/session.log"
[ -f .devcarry/jax_cache.tgz ] && tar -xzf .devcarry/jax_cache.tgz -C "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD

log() { echo "$*" | tee -a "$LOG"; }
# item NAME LIMIT_S COMMAND...: runs COMMAND with OUT=$OUT/NAME under min(LIMIT_S, time left - 5 s);
# skipped when fewer than 20 s are left or ONLY does not name it. Output lines go to $OUT/NAME/log,
# JSON lines (and FAIL lines) also to session.log.
item() {
    local name=$1 limit=$2; shift 2
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    local left=$((DEADLINE - $(date +%s) - 5))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then log "== $name: skipped, ${left}s left"; return 0; fi
    mkdir -p "$OUT/$name"
    log "== $name (limit ${limit}s, t=$(( $(date +%s) - START ))s): $*"
    OUT="$OUT/$name" timeout "$limit" "$@" > "$OUT/$name/log" 2>&1
    local rc=$?
    grep -E '^\{|^FAIL|^error' "$OUT/$name/log" | cut -c1-1500 | tee -a "$LOG"
    [ "$rc" -ne 0 ] && { log "   $name: exit $rc"; tail -c 1500 "$OUT/$name/log" >> "$LOG"; }
    return 0
}

{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,memory.used \
    --format=csv; git log -1 --format=%h 2>/dev/null; nproc
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', \
optax.__version__, 'torch', torch.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"

# 1. the peer and our step, same card, same call (the ratio): torch bf16 channels-last batch 2 and 8,
#    and batch 8 with frozen BN (as both references train); ours batch 8 bf16 frozen BN, both atrous modes
item anchor 75 python3 .devcarry/anchor_torch_deeplabv2.py same-run
item step 150 python3 -m benchmarks.bench_train_step --configs 8:bfloat16 --atrous dilated,space_to_batch \
    --loss upsample --steps 10 --rounds 2 --warmup 2 --save-hlo "$OUT/step/hlo"
# 2. pseudo-labelling img/s at 1024x2048, flip and MST + flip (all passes of a round included)
item pseudo_label 130 python3 -m benchmarks.bench_pseudo_label ${BENCH_PL_ARGS:---images 16 --batch 2 --configs single,mst}
# 3. the host pipeline on this machine's cores (if the pipeline benchmark exists)
[ -f benchmarks/bench_pipeline.py ] && item pipeline 50 python3 -m benchmarks.bench_pipeline ${BENCH_PIPELINE_ARGS:-}
# 4. the GPU-size synthetic round (source-only + one CBST round), beside the full-size parity check
#    (float32, JAX default and 'highest' precision, both atrous modes against torch)
item synthetic 100 python3 -m experiments.synthetic --config=gpu --config.methods=source_only,cbst \
    --config.synthetic.num_source=1000 --config.synthetic.num_target_train=200 \
    --config.synthetic.num_target_val=200 --config.source_training.steps=300 --config.self_training.rounds=1 \
    --config.self_training.steps_per_round=100 --config.input.workers=12 --workdir=/tmp/syn &
item parity 90 python3 -m benchmarks.check_parity_gpu
wait
cp /tmp/syn/seed_0/results.md "$OUT/synthetic/" 2>/dev/null; cp /tmp/syn/seed_0/metrics.jsonl "$OUT/synthetic/" 2>/dev/null
# 5. where the step's time goes (a profile; the program comes from the cache), then XLA flags
item profile 40 python3 -m benchmarks.bench_train_step --configs 8:bfloat16 --atrous space_to_batch \
    --loss upsample --steps 3 --warmup 1 --profile /tmp/prof
item loss_stride 60 python3 -m benchmarks.bench_train_step --configs 8:bfloat16 --atrous dilated,space_to_batch \
    --loss stride --steps 10 --rounds 1
XLA_FLAGS="--xla_gpu_force_conv_nhwc=true" item flag_nhwc 50 python3 -m benchmarks.bench_train_step \
    --configs 8:bfloat16 --atrous dilated,space_to_batch --loss upsample --steps 10
XLA_FLAGS="--xla_gpu_autotune_level=0" item flag_noautotune 50 python3 -m benchmarks.bench_train_step \
    --configs 8:bfloat16 --atrous space_to_batch --loss upsample --steps 10
# Further XLA GPU flags (present in jaxlib 0.10.2's XLA; none measured here): --xla_gpu_force_conv_nchw,
# --xla_gpu_enable_command_buffer= (CUDA graphs off), --xla_gpu_experimental_enable_conv_fusion=true,
# --xla_gpu_cudnn_gemm_fusion_level=1..3, --xla_gpu_exhaustive_tiling_search=true, --xla_gpu_triton_gemm_any=true.

du -sh "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | tee -a "$LOG"
tar -czf /tmp/jax_cache.tgz -C "$JAX_COMPILATION_CACHE_DIR" . 2>/dev/null \
    && [ "$(stat -c %s /tmp/jax_cache.tgz)" -lt 50000000 ] && cp /tmp/jax_cache.tgz "$OUT/"
log "== done at t=$(( $(date +%s) - START ))s"; date -u | tee -a "$LOG"
