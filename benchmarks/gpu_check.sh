#!/usr/bin/env bash
# First check of a GPU machine, one command (about 8 minutes on one H100/H200 at the default budget):
#
#   1. `launch.train --dry-run` of every shipped config (placeholder data/codec/text-encoder folders,
#      written here) and `benchmarks.plan video-1b3 … --fit` for this GPU;
#   2. bf16 training steps of video-1b3 at 21×60×104 latents (480×832, 81 frames, 32,760 tokens) per
#      activation-checkpointing mode (selective, full, every_2, none) × torch.compile off/on: MFU per case;
#   3. the attention micro-benchmark at head dim 128, 32,760 and 75,600 tokens, per backend (SDPA pinned
#      to flash / cuDNN / memory-efficient, FlashAttention if installed): forward and forward+backward;
#   4. with more than one GPU: NCCL parity under torchrun: the tiny trainer's losses and gradient norms
#      at cp=2 (Ulysses, and as a ring) against one GPU, and at dp_shard=2 against dp_replicate=2;
#   5. the planner's prediction (parallel.plan) next to every case measured in 2.
#
# Everything goes to one folder, benchmarks/results/DATE-gpu-check/: report.md (environment, then one
# table per section; every case has a result or the reason it has none), cases.tsv, logs/ and json/.
# Each section and each case has its own time limit (`timeout`), so one hung case cannot eat the budget;
# a failed case is a row of the report, not the end of the script.
#
#   bash benchmarks/gpu_check.sh                      # on a GPU node, from anywhere
#   bash benchmarks/gpu_check.sh --budget 900         # more time: compiled cases that did not fit
#   bash benchmarks/gpu_check.sh --only 2,5           # some sections only
#   bash benchmarks/gpu_check.sh --cpu-smoke --out /tmp/check   # every section at tiny sizes on a CPU
#
# It uses whatever python is first on PATH (or $PYTHON) and needs no network. Exit status: 0 when every
# case ran (an out-of-memory case is a result; "skipped" cases say why by design), 1 when a case failed,
# timed out or did not fit the budget, 2 when torch or CUDA is missing (the report then says what to
# install; the sections that need no GPU still run).
set -euo pipefail
{ # read whole before anything runs: a file edited or pulled during a check cannot change it


usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
SMOKE=0
OUT=""
BUDGET=480
ONLY="1,2,3,4,5"
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --out) OUT=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --only) ONLY=${2:?--only needs section numbers, e.g. 2,5}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget '$BUDGET' is not a number of seconds" >&2; exit 2; }
[[ $ONLY =~ ^[1-5](,[1-5])*$ ]] || { echo "gpu_check.sh: --only '$ONLY': expected numbers 1-5 joined by ','" >&2; exit 2; }

cd "$ROOT"
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python || command -v python3 || true)
fi
[[ -n $PYTHON ]] || { echo "gpu_check.sh: no python on PATH (set PYTHON=/path/to/python)" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ -z $OUT ]]; then
    OUT="$ROOT/benchmarks/results/$(date +%F)-gpu-check"
    n=2
    base=$OUT
    while [[ -e $OUT ]]; do OUT="$base-$n"; n=$((n + 1)); done
fi
mkdir -p "$OUT/logs" "$OUT/json"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
# on exit, cases still running in the background (--cpu-smoke runs two at a time) are stopped first:
# their timeout processes (own process groups, so Ctrl-C misses them), then their shells
stop_cases() {
    local pid
    for pid in $(jobs -p); do
        pkill -TERM -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
}
trap 'stop_cases; rm -rf "$WORK"' EXIT

START=$(date +%s)
DEADLINE=$((START + BUDGET))
# Section budgets and case limits below are sized for the default 480 s and grow with --budget.
scaled() { echo $(($1 * BUDGET / 480)); }
MIN_CASE=15 # a case with less time than this left is "not run", not a sure timeout
CASES="$OUT/cases.tsv"
SECTIONS="$OUT/sections.tsv"
printf 'section\tcase\tstatus\tseconds\tdetail\tlog\tjson\n' >"$CASES"
printf 'section\ttitle\tbudget_s\tstatus\treason\n' >"$SECTIONS"
SECTION=0
SECTION_END=$DEADLINE

say() { printf '[gpu_check %4ds] %s\n' "$(($(date +%s) - START))" "$*"; }
tsv() { local IFS=$'\t'; printf '%s\n' "$*" | tr -d '\r' ; }
record() { tsv "$SECTION" "$1" "$2" "$3" "$4" "${5:-}" "${6:-}" >>"$CASES"; }
wanted() { [[ ",$ONLY," == *",$1,"* ]]; }

# section N TITLE BUDGET: start section N with at most BUDGET seconds (less if the deadline is nearer,
# keeping RESERVE seconds for the sections after it).
section() {
    SECTION=$1
    local now left budget
    budget=$(scaled "$3")
    now=$(date +%s)
    left=$((DEADLINE - now - $(scaled "${RESERVE:-0}")))
    ((budget > left)) && budget=$left
    ((budget < 0)) && budget=0
    SECTION_END=$((now + budget))
    tsv "$1" "$2" "$budget" ran "" >>"$SECTIONS"
    say "section $1: $2 (${budget} s)"
}

# skip_section N TITLE REASON: the section is listed in the report with the reason it did not run.
skip_section() {
    tsv "$1" "$2" 0 "not run" "$3" >>"$SECTIONS"
    say "section $1: $2: not run: $3"
}

# run_case NAME LIMIT [--stdout FILE] [--json FILE] -- CMD…: run CMD with at most LIMIT seconds (less
# if the section's end is nearer) in its own process group, log in logs/, and record the outcome.
run_case() {
    local name=$1 limit=$2 stdout="" json=""
    shift 2
    while [[ $1 != -- ]]; do
        case $1 in
            --stdout) stdout=$2 ;;
            --json) json=$2 ;;
        esac
        shift 2
    done
    shift
    local left=$((SECTION_END - $(date +%s)))
    ((SMOKE)) || limit=$(scaled "$limit")
    ((limit > left)) && limit=$left
    if ((limit < MIN_CASE)); then
        record "$name" "not run" 0 "the time budget was spent (--budget $BUDGET; rerun with more or with --only $SECTION)"
        say "  $name: not run (time budget spent)"
        return 0
    fi
    local log="logs/$SECTION-$name.log" t0 rc=0 status detail=""
    t0=$(date +%s)
    if [[ -n $stdout ]]; then
        timeout -k 10 "$limit" "$@" >"$OUT/$stdout" 2>"$OUT/$log" </dev/null || rc=$?
    else
        timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1 </dev/null || rc=$?
    fi
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout; detail="killed after its ${limit} s limit" ;;
        *) status=failed; detail="exit status $rc" ;;
    esac
    record "$name" "$status" "$(($(date +%s) - t0))" "$detail" "$log" "${json:-$stdout}"
    say "  $name: $status${detail:+ ($detail)}"
}

# start_case NAME LIMIT … -- CMD…: run_case, or with JOBS > 1 the same in the background (at most JOBS
# at once), its row kept aside until finish_cases appends every row in the order the cases started.
JOBS=1
STARTED=0
CASE_NAMES=()
start_case() {
    if ((JOBS <= 1)); then
        run_case "$@"
        return 0
    fi
    while (($(jobs -rp | wc -l) >= JOBS)); do wait -n 2>/dev/null || sleep 0.1; done # (no wait -n: bash < 4.3)
    STARTED=$((STARTED + 1))
    CASE_NAMES[STARTED]=$1
    local rows="$WORK/case-$SECTION-$STARTED.tsv"
    : >"$rows" # made here, so a case whose shell dies still leaves its (empty) file
    (CASES="$rows" && run_case "$@") &
}

# in_order CMD…: CMD's rows (a case recorded without running) take their place among start_case's.
in_order() {
    ((JOBS <= 1)) && { "$@"; return 0; }
    STARTED=$((STARTED + 1))
    CASE_NAMES[STARTED]=""
    local CASES="$WORK/case-$SECTION-$STARTED.tsv"
    : >"$CASES"
    "$@"
}

# finish_cases: wait for the cases start_case left running, then add their rows to cases.tsv.
finish_cases() {
    wait || true
    local i rows
    for ((i = 1; i <= STARTED; i++)); do
        rows="$WORK/case-$SECTION-$i.tsv"
        if [[ -s $rows ]]; then
            cat "$rows" >>"$CASES"
        elif [[ -n ${CASE_NAMES[i]:-} ]]; then # its shell died before recording: a failure, not a gap
            record "${CASE_NAMES[i]}" failed 0 "no result: the case's shell exited before recording one"
        fi
    done
    STARTED=0
}

# ---------------------------------------------------------------------------------------- environment
say "output: $OUT"
NGPU=0 GPU="" PLAN_GPU=h100
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi >"$OUT/logs/nvidia-smi.txt" 2>&1 || true
    nvidia-smi --query-gpu=index,name,memory.total,driver_version,power.limit --format=csv,noheader \
        >"$OUT/nvidia-smi.csv" 2>>"$OUT/logs/nvidia-smi.txt" || true
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
GPU_NAME=$(head -n1 "$OUT/nvidia-smi.csv" 2>/dev/null | cut -d, -f2 | sed 's/^ *//' || true)

GPU_CHECK_MODE=$([[ $SMOKE == 1 ]] && echo cpu-smoke || echo gpu) GPU_CHECK_GPU_NAME="$GPU_NAME" \
    GPU_CHECK_NGPU="$NGPU" GPU_CHECK_BUDGET="$BUDGET" GPU_CHECK_COMMAND="$COMMAND" \
    timeout -k 5 120 "$PYTHON" - "$OUT/env.json" >"$OUT/logs/0-env.log" 2>&1 <<'EOF' || true
import importlib.metadata as md, importlib.util, json, os, platform, subprocess, sys

env = {k[10:].lower(): v for k, v in os.environ.items() if k.startswith("GPU_CHECK_")}
env["python"] = f"{platform.python_version()} ({sys.executable})"
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
try:
    env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                   text=True, timeout=10).stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    env["commit"] = None
try:
    import torch
except Exception as e:  # noqa: BLE001 - any import failure is what the report must say
    env["torch_error"] = f"{type(e).__name__}: {e}"
else:
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if env["cuda_available"]:
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        props = torch.cuda.get_device_properties(0)
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
        env["gpu_name"] = env.get("gpu_name") or env["devices"][0]  # no nvidia-smi in some containers
        env["ngpu"] = str(max(int(env.get("ngpu") or 0), len(env["devices"])))
# the planner's GPU table (parallel.plan.GPUS); another GPU is planned as an H100 (the report says so)
name = env.get("gpu_name", "").lower()
env["gpu"] = next((k for k in ("h200", "h100", "a100", "b200") if k in name), "")
env["plan_gpu"] = env["gpu"] or "h100"
env["flash_attn"] = version("flash_attn") or version("flash-attn")
env["flash_attn_3"] = importlib.util.find_spec("flash_attn_interface") is not None
env["triton"] = version("triton")
missing = []
for module in ("dit.model", "parallel.parallelize", "launch.train", "benchmarks.throughput"):
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{module}: {type(e).__name__}: {e}")
env["project_import_errors"] = missing
with open(sys.argv[1], "w") as f:
    json.dump(env, f, indent=1)
print(json.dumps(env, indent=1))
EOF

read_env() { "$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]))" "$OUT/env.json" "$1" 2>/dev/null || echo None; }
NEED=""
if [[ ! -s $OUT/env.json ]]; then
    NEED="python ($PYTHON) could not run the environment probe: see logs/0-env.log"
elif [[ $(read_env torch) == None ]]; then
    NEED="torch is not importable by $PYTHON ($(read_env torch_error)). Install a CUDA build of torch, e.g. on the cluster: pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128, then pip install -e '.[deepspeed,diffusers,lora]'"
fi
NOGPU=""
if [[ -z $NEED && $SMOKE == 0 && $(read_env cuda_available) != True ]]; then
    NOGPU="torch.cuda.is_available() is False (torch $(read_env torch), CUDA build: $(read_env torch_cuda), GPUs seen by nvidia-smi: $NGPU). Install a CUDA build of torch that matches the driver, e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 (this check downloads nothing), or run with --cpu-smoke"
fi
if [[ -s $OUT/env.json ]]; then
    GPU=$(read_env gpu) PLAN_GPU=$(read_env plan_gpu) NGPU=$(read_env ngpu)
fi
[[ $PLAN_GPU =~ ^(h100|h200|a100|b200)$ ]] || PLAN_GPU=h100
[[ $NGPU =~ ^[0-9]+$ ]] || NGPU=0
[[ -n $NEED ]] && echo "gpu_check.sh: $NEED" >&2
[[ -n $NOGPU ]] && echo "gpu_check.sh: $NOGPU" >&2

if [[ $SMOKE == 1 ]]; then
    DEVICE=cpu
    # fp32 (a CPU without bf16 matmul units is slow at it) and a given peak (measuring one takes
    # seconds per process): MFU means nothing on a CPU, the smoke run checks the plumbing
    SMOKE_ARGS=(--warmup 1 --iters 1 --threads 1 --dtype fp32 --peak-tflops 1)
    STEP_ARGS=(--presets tiny --shapes 4x8x8 --depth 2 --text-len 8 "${SMOKE_ARGS[@]}")
    ATTN_ARGS=(--attn-shapes 2x128x256,2x128x512 "${SMOKE_ARGS[@]}")
    STEP_LIMIT=60 COMPILED_LIMIT=60 ATTN_LIMIT=60 TRAIN_LIMIT=90
    # Two cases at a time in sections 1-3 (still one process per case): each is one thread, mostly
    # importing torch, and a CI machine has two cores. A GPU run keeps its measurements one at a time.
    JOBS=2
else
    DEVICE=cuda
    # 21×60×104 latents = 480×832 pixels, 81 frames (Wan VAE 4×8×8), 32,760 tokens at patch 1×2×2
    STEP_ARGS=(--presets video-1b3 --shapes 21x60x104 --text-len 512 --warmup 2 --iters 3 --dtype bf16)
    # video-1b3 at 480p (12 heads) and video-14b at 720p (21×90×160 latents: 75,600 tokens, 40 heads)
    ATTN_ARGS=(--attn-shapes 12x128x32760,40x128x75600 --warmup 2 --iters 5 --dtype bf16)
    STEP_LIMIT=75 COMPILED_LIMIT=150 ATTN_LIMIT=45 TRAIN_LIMIT=60
fi
AC_MODES=(selective full every_2 none) # the most likely best first: a short budget cuts the last ones
ATTN_BACKENDS=(sdpa:flash sdpa:cudnn sdpa:efficient flash_attn)
PARITY=0
[[ $SMOKE == 1 || $NGPU -gt 1 ]] && PARITY=1

# ------------------------------------------------------------------ 1. dry runs of the shipped configs
TITLE1="Dry runs of the shipped configs and the planner"
if ! wanted 1; then
    skip_section 1 "$TITLE1" "not asked for (--only $ONLY)"
elif [[ -n $NEED ]]; then
    skip_section 1 "$TITLE1" "$NEED"
else
    RESERVE=$((PARITY ? 410 : 385)) section 1 "$TITLE1" 75
    # Placeholder folders for the paths a config must be given (`???`): dry runs read a VAE's
    # config.json (geometry, no weights) and list the shards, nothing more.
    mkdir -p "$WORK/shards" "$WORK/val" "$WORK/wan-vae" "$WORK/wan22-vae" "$WORK/umt5"
    printf '{"_class_name": "AutoencoderKLWan", "z_dim": 16, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [false, true, true]}\n' \
        >"$WORK/wan-vae/config.json"
    # Wan2.2's VAE (the TI2V recipe): a 2×2 patchify before the 8× encoder, 48 channels
    printf '{"_class_name": "AutoencoderKLWan", "z_dim": 48, "in_channels": 12, "out_channels": 12, "patch_size": 2, "is_residual": true, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [false, true, true]}\n' \
        >"$WORK/wan22-vae/config.json"
    printf '{"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": 4096}\n' >"$WORK/umt5/config.json"
    configs=(launch/configs/*.yaml)
    if ((SMOKE)); then
        # the CPU smoke test checks the section's machinery on one config of each world size (and the
        # Wan2.2 VAE placeholder); tests/launch/test_dryrun.py dry-runs every shipped config
        configs=(launch/configs/tiny.yaml launch/configs/video-1b3.yaml launch/configs/wan2.2-ti2v-5b-i2v.yaml)
    fi
    for config in "${configs[@]}"; do
        name=$(basename "$config" .yaml)
        case $name in
            tiny) world=1 ;;
            video-*) world=64 ;;
            *) world=8 ;;
        esac
        overrides=()
        while IFS= read -r line; do [[ -n $line ]] && overrides+=("$line"); done < <(
            "$PYTHON" - "$config" "$WORK" <<'EOF' 2>>"$OUT/logs/1-placeholders.log"
import sys, yaml
placeholder = {"data.shards": "shards", "data.val_shards": "val", "data.codec": "wan-vae",
               "data.text_encoder": "umt5", "init.from": "diffusers-root"}  # the source is not read
if sys.argv[1].rsplit("/", 1)[-1].startswith("wan2.2"):
    placeholder["data.codec"] = "wan22-vae"
def walk(node, prefix=""):
    for key, value in (node or {}).items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from walk(value, path + ".")
        elif value == "???" or (path in placeholder and value in ("", None)):
            yield path
for path in walk(yaml.safe_load(open(sys.argv[1]))):
    print(f"{path}={sys.argv[2]}/{placeholder.get(path, 'missing')}")
EOF
        )
        start_case "dryrun-$name" 60 --stdout "json/1-dryrun-$name.json" -- \
            "$PYTHON" -m launch.train --config "$config" --dry-run --world-size "$world" --gpu "$PLAN_GPU" \
            ${overrides[@]+"${overrides[@]}"} # (bash < 4.4 calls an empty "${a[@]}" unbound)
    done
    start_case plan-video-1b3-fit 60 --stdout json/1-plan-video-1b3-fit.json -- \
        "$PYTHON" -m benchmarks.plan video-1b3 --frames 21 --height 60 --width 104 --gpu "$PLAN_GPU" \
        --gpus 1 --fit
    finish_cases
fi
RESERVE=0

# ------------------------------------------------------------------------------ 2. training steps
TITLE2="Training steps: $([[ $SMOKE == 1 ]] && echo "tiny (2 blocks) at 4×8×8 latents, fp32 on CPU" || echo "video-1b3 at 21×60×104 latents, bf16")"
if ! wanted 2; then
    skip_section 2 "$TITLE2" "not asked for (--only $ONLY)"
elif [[ -n $NEED || -n $NOGPU ]]; then
    skip_section 2 "$TITLE2" "${NEED:-$NOGPU}"
else
    RESERVE=$((PARITY ? 195 : 75)) section 2 "$TITLE2" $((PARITY ? 215 : 310))
    for compile in off on; do
        for ac in "${AC_MODES[@]}"; do
            name="steps-ac=$ac-compile=$compile"
            if [[ $compile == on && $SMOKE == 1 ]]; then
                in_order record "$name" skipped 0 "--cpu-smoke: inductor's C++ build of each block takes minutes on a CPU"
                continue
            fi
            start_case "$name" "$([[ $compile == on ]] && echo "$COMPILED_LIMIT" || echo "$STEP_LIMIT")" \
                --json "json/2-$name.json" -- \
                "$PYTHON" -m benchmarks.throughput --device "$DEVICE" "${STEP_ARGS[@]}" --backends sdpa \
                --ac "$ac" --compile "$compile" --no-attention --no-report \
                --json "$OUT/json/2-$name.json"
        done
    done
    finish_cases
fi
RESERVE=0

# --------------------------------------------------------------------------- 3. attention kernels
TITLE3="Attention kernels at head dim 128"
if ! wanted 3; then
    skip_section 3 "$TITLE3" "not asked for (--only $ONLY)"
elif [[ -n $NEED || -n $NOGPU ]]; then
    skip_section 3 "$TITLE3" "${NEED:-$NOGPU}"
else
    RESERVE=$((PARITY ? 120 : 0)) section 3 "$TITLE3" 75
    for backend in "${ATTN_BACKENDS[@]}"; do
        name="attention-${backend/:/-}"
        start_case "$name" "$ATTN_LIMIT" --json "json/3-$name.json" -- \
            "$PYTHON" -m benchmarks.throughput --device "$DEVICE" --no-train --backends "$backend" \
            "${ATTN_ARGS[@]}" --no-report --json "$OUT/json/3-$name.json"
    done
    finish_cases
fi
RESERVE=0

# ------------------------------------------------------------------------------ 4. NCCL parity
TITLE4="Parity of parallel layouts under torchrun ($([[ $SMOKE == 1 ]] && echo "gloo, CPU" || echo NCCL))"
if ! wanted 4; then
    skip_section 4 "$TITLE4" "not asked for (--only $ONLY)"
elif [[ -n $NEED || -n $NOGPU ]]; then
    skip_section 4 "$TITLE4" "${NEED:-$NOGPU}"
elif ((PARITY == 0)); then
    skip_section 4 "$TITLE4" "$NGPU GPU(s) visible: parity needs two"
else
    section 4 "$TITLE4" 120
    run_case synthetic-data 30 -- "$PYTHON" -m data.synthetic "$WORK/synthetic" --num 32 --val-num 0 \
        --seed 1 --frames 8,12 --samples-per-shard 4
    # The tiny demo model for 3 steps on one 32×32 bucket, every step logged (loss and grad_norm).
    # Layouts that read the same data are compared: one GPU vs cp=2 (data-parallel size 1 both), and
    # dp_shard=2 vs dp_replicate=2 (data-parallel size 2 both); dp_shard=2 vs cp=2 would split the
    # batches differently, so their losses differ by design.
    train=(--config launch/configs/tiny.yaml "data.shards=$WORK/synthetic" "data.val_shards=$WORK/synthetic"
        data.num_workers=0 data.buckets.fps=8 "data.buckets.buckets=[{frames: 4, height: 32, width: 32, batch_size: 2}]"
        train.steps=3 train.warmup=1 logging.every=1 eval.every=0 logging.sample_every=0 checkpoint.every=0
        run.progress=lines)
    torchrun=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m launch.train)
    run_case train-1gpu "$TRAIN_LIMIT" --json runs/1gpu/metrics.jsonl -- \
        "$PYTHON" -m launch.train "${train[@]}" "run.dir=$OUT/runs/1gpu"
    run_case train-cp2 "$TRAIN_LIMIT" --json runs/cp2/metrics.jsonl -- \
        "${torchrun[@]}" "${train[@]}" "run.dir=$OUT/runs/cp2" parallel.cp=2
    # the same split as a ring (cp_ring=2): the fused CUDA ring kernels and their merged-LSE backward
    run_case train-cp2ring "$TRAIN_LIMIT" --json runs/cp2ring/metrics.jsonl -- \
        "${torchrun[@]}" "${train[@]}" "run.dir=$OUT/runs/cp2ring" parallel.cp=2 parallel.cp_ring=2
    run_case train-dp_shard2 "$TRAIN_LIMIT" --json runs/dp_shard2/metrics.jsonl -- \
        "${torchrun[@]}" "${train[@]}" "run.dir=$OUT/runs/dp_shard2" parallel.dp_shard=2
    run_case train-dp_replicate2 "$TRAIN_LIMIT" --json runs/dp_replicate2/metrics.jsonl -- \
        "${torchrun[@]}" "${train[@]}" "run.dir=$OUT/runs/dp_replicate2" parallel.dp_replicate=2 \
        parallel.dp_shard=1
    rm -rf "$OUT"/runs/*/checkpoints "$OUT"/runs/*/tb # only metrics.jsonl and config.yaml are kept
fi

# ---------------------------------------------------------------- 5. the planner next to the measures
TITLE5="The planner (parallel.plan) next to the measured training steps"
if ! wanted 5; then
    skip_section 5 "$TITLE5" "not asked for (--only $ONLY)"
elif [[ -n $NEED ]]; then
    skip_section 5 "$TITLE5" "$NEED"
else
    tsv 5 "$TITLE5" - ran "" >>"$SECTIONS" # computed while the report is assembled
fi

# ----------------------------------------------------------------------------------------- report
TOTAL=$(($(date +%s) - START))
if ! "$PYTHON" -m benchmarks.report gpu-check "$OUT" --seconds "$TOTAL" >"$OUT/logs/report.log" 2>&1; then
    {
        echo "# GPU check (report assembly failed: see logs/report.log)"
        echo
        echo "Sections:"
        echo '```'
        cat "$SECTIONS"
        echo '```'
        echo "Cases:"
        echo '```'
        cat "$CASES"
        echo '```'
    } >"$OUT/report.md"
    echo "gpu_check.sh: could not assemble report.md (logs/report.log); wrote the raw tables instead" >&2
fi
say "report: $OUT/report.md (${TOTAL} s)"
if [[ -n $NEED || -n $NOGPU ]]; then
    exit 2
fi
if awk -F'\t' 'NR > 1 && ($3 == "failed" || $3 == "timeout" || $3 == "not run") {bad = 1} END {exit !bad}' "$CASES"; then
    exit 1
fi
exit 0
}
