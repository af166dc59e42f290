#!/usr/bin/env bash
# One lent-GPU call (device time is scarce; one call may run at most 600 s): the PyTorch peer and
# our benchmarks in priority order, each under its own time limit (about 530 s in all), everything
# written under $OUT as it finishes. Needs, carried with the call: .whl/ (ml_collections wheel)
# and .devcarry/ (a copy of ../shared/bench/anchor_torch_deeplabv2.py). Every script here is run
# tiny on CPU by the test suite (tests/test_benchmarks_smoke.py, the --smoke flags) first.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/session.log"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ date -u; nvidia-smi -L; git log -1 --format=%h 2>/dev/null; python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"
echo "== torch anchor" | tee -a "$LOG"; timeout 50 python3 .devcarry/anchor_torch_deeplabv2.py 2>&1 | grep -v Warning | tee -a "$LOG"
echo "== jax train step (the project's step)" | tee -a "$LOG"
timeout 140 python3 -m benchmarks.bench_train_step --step project --configs 2:float32,2:bfloat16,8:bfloat16 \
    --steps 8 --warmup 1 2>&1 | grep '^{' | tee -a "$LOG"; cp "$OUT/bench_jax.json" "$OUT/bench_jax_project.json" 2>/dev/null
echo "== pseudo-labelling" | tee -a "$LOG"; timeout 140 python3 -m benchmarks.bench_pseudo_label --images 8 --batch 2 2>&1 | grep '^{' | tee -a "$LOG"
echo "== parity + synthetic round" | tee -a "$LOG"
( timeout 110 python3 -m experiments.synthetic --config=gpu --config.methods=source_only,cbst \
    --config.synthetic.num_source=1000 --config.synthetic.num_target_train=200 --config.synthetic.num_target_val=200 \
    --config.source_training.steps=300 --config.self_training.rounds=1 --config.self_training.steps_per_round=100 \
    --config.input.workers=12 --workdir=/tmp/syn > /tmp/syn.log 2>&1;
  cp /tmp/syn/seed_0/results.md "$OUT/synthetic_results.md" 2>/dev/null; cp /tmp/syn/seed_0/metrics.jsonl "$OUT/synthetic_metrics.jsonl" 2>/dev/null;
  tail -c 3000 /tmp/syn.log > "$OUT/synthetic.log" ) &
timeout 65 python3 -m benchmarks.check_parity_gpu 2>&1 | grep '^{' | tee -a "$LOG"
wait
echo "== jax train step (bare step, for comparison)" | tee -a "$LOG"
timeout 90 python3 -m benchmarks.bench_train_step --step minimal --configs 2:bfloat16,8:bfloat16 \
    --steps 8 --warmup 1 2>&1 | grep '^{' | tee -a "$LOG"
date -u | tee -a "$LOG"
