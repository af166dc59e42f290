#!/usr/bin/env bash
# One lent-GPU call (device time is scarce): the PyTorch peer and our benchmarks in priority
# order, each under its own time limit, everything written under $OUT as it finishes.
# Needs, carried with the call: .whl/ (ml_collections wheel) and .devcarry/ (the torch anchor).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; LOG="$OUT/session.log"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ date -u; nvidia-smi -L; python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"; } 2>&1 | tee -a "$LOG"
echo "== torch anchor" | tee -a "$LOG"; timeout 55 python3 .devcarry/anchor_torch_deeplabv2.py 2>&1 | grep -v Warning | tee -a "$LOG"
echo "== jax train step" | tee -a "$LOG"; timeout 110 python3 -m benchmarks.bench_train_step --steps 8 --warmup 1 2>&1 | grep '^{' | tee -a "$LOG"
echo "== pseudo-labelling" | tee -a "$LOG"; timeout 60 python3 -m benchmarks.bench_pseudo_label --images 8 --batch 2 2>&1 | grep '^{' | tee -a "$LOG"
echo "== parity + synthetic round" | tee -a "$LOG"
( timeout 65 python3 -m experiments.synthetic --config.preset=gpu --config.methods=source_only,cbst \
    --config.synthetic.num_source=1000 --config.synthetic.num_target_train=200 --config.synthetic.num_target_val=200 \
    --config.source_training.steps=300 --config.self_training.rounds=1 --config.self_training.steps_per_round=100 \
    --config.input.workers=12 --workdir=/tmp/syn > /tmp/syn.log 2>&1;
  cp /tmp/syn/seed_0/results.md "$OUT/synthetic_results.md" 2>/dev/null; cp /tmp/syn/seed_0/metrics.jsonl "$OUT/synthetic_metrics.jsonl" 2>/dev/null;
  tail -c 3000 /tmp/syn.log > "$OUT/synthetic.log" ) &
timeout 65 python3 -m benchmarks.check_parity_gpu 2>&1 | grep '^{' | tee -a "$LOG"
wait
date -u | tee -a "$LOG"
