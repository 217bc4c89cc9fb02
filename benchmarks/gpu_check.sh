#!/usr/bin/env bash
# Every GPU step of issue 17 in one command, for a bare GPU machine (no network, its own
# python3 with torch + CUDA, Lightning, torchmetrics): install the carried wheels, build the
# extension with its CUDA kernels for this GPU, run the CUDA tests, bench_ops.py with TF32
# off and on, and short fits of the CIFAR two-layer and CPU-sized FER configs on the GPU.
# Everything goes under one folder, with summary.txt (and steps.tsv) listing each step's
# status, time and result. A failed step is recorded and the next one runs; the exit status
# is 0 only if no step failed. Steps share one time budget (GPU_CHECK_BUDGET_S, default 450 s)
# so the whole run ends inside 8 minutes there; a step the budget cannot reach is NOT_RUN.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          (default runs/gpu_check; also `make gpu-check`)
#
# Before a GPU session, here: benchmarks/gpu_check_prepare.sh   (wheels into .whl/, real-data
# subsets into data/gpu_check/; both git-ignored; prints the size that will travel).
# The device tool's call (command under 2000 characters; benchmarks/NOTES.md says more):
#   run(command="GPU_CHECK_ARCHIVE=$OUT/gpu_check.tar.gz bash benchmarks/gpu_check.sh /tmp/gpu_check; rc=$?; cp /tmp/gpu_check/summary.txt $OUT/; exit $rc",
#       carry=[".whl", "data/gpu_check"], timeout_s=540)
#
# Checking this script without a GPU: GPU_CHECK_ALLOW_CPU=1 benchmarks/gpu_check.sh
# (uses .venv/bin/python when present; the installed build is checked, not rebuilt; cuda-marked
# tests skip; bench runs on CPU with short timings, TF32 is skipped; tiny fits on CPU on
# generated data). tests/test_gpu_check.py runs it so.
#
# Environment (defaults for GPU mode / CPU mode):
#   GPU_CHECK_ALLOW_CPU=0|1        run without a GPU (0)
#   GPU_CHECK_PYTHON               interpreter (python3 / .venv/bin/python if present)
#   GPU_CHECK_BUDGET_S             seconds for all steps together (450)
#   GPU_CHECK_MIN_STEP_S           a step starts only with this much of the budget left (15)
#   GPU_CHECK_STEPS                comma-separated steps to run (all); the others are recorded as skip
#   GPU_CHECK_WHEELS               folder of carried wheels (.whl); GPU_CHECK_INSTALL_WHEELS=1|0 (1 / 0)
#   GPU_CHECK_SITE                 where the wheels are installed, put on PYTHONPATH (/tmp/gpu_check_site)
#   GPU_CHECK_BUILD=1|0            build the extension (1 / 0: only check that the installed one loads)
#   GPU_CHECK_PYTEST_ARGS          extra pytest arguments ()
#   GPU_CHECK_BENCH_ARGS           bench_ops.py arguments ("--min-run-time 0.2 --rounds 2 --processes 1" / "--min-run-time 0.01 --rounds 1 --processes 1"; one process: the step has 120 s)
#   GPU_CHECK_DATA=auto|real|generated   fits' data (auto: data/gpu_check if there, else generated / generated)
#   GPU_CHECK_CARRIED_DATA         the real-data subsets (data/gpu_check, made by gpu_check_prepare.sh)
#   GPU_CHECK_FAKE_N               generated: images per CIFAR batch and FER Usage (1000 / 40)
#   GPU_CHECK_FIT_EPOCHS           epochs of each fit (3 / 1)
#   GPU_CHECK_FIT_ARGS             extra fit arguments ("" / limit_*_batches 2,1,1)
#   GPU_CHECK_WORK                 scratch folder for data (/tmp/gpu_check_work.PID, removed at the end)
#   GPU_CHECK_ARCHIVE              if set, OUT_DIR is also written there as .tar.gz (checkpoints left out)
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

ALLOW_CPU=${GPU_CHECK_ALLOW_CPU:-0}
if [[ $ALLOW_CPU == 1 ]]; then
    MODE=cpu
    default_python=python3
    [[ -x $ROOT/.venv/bin/python ]] && default_python=$ROOT/.venv/bin/python
else
    MODE=gpu
    default_python=python3
fi
cpu_or_gpu() { if [[ $MODE == gpu ]]; then echo "$1"; else echo "$2"; fi; }

PY=${GPU_CHECK_PYTHON:-$default_python}
OUT_DIR=${1:-${GPU_CHECK_OUT:-runs/gpu_check}}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
MIN_STEP=${GPU_CHECK_MIN_STEP_S:-15}
STEPS=${GPU_CHECK_STEPS:-all}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
INSTALL_WHEELS=${GPU_CHECK_INSTALL_WHEELS:-$(cpu_or_gpu 1 0)}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
BUILD=${GPU_CHECK_BUILD:-$(cpu_or_gpu 1 0)}
PYTEST_ARGS=${GPU_CHECK_PYTEST_ARGS:-}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-$(cpu_or_gpu "--min-run-time 0.2 --rounds 2 --processes 1" "--min-run-time 0.01 --rounds 1 --processes 1")}
DATA_MODE=${GPU_CHECK_DATA:-$(cpu_or_gpu auto generated)}
CARRIED_DATA=${GPU_CHECK_CARRIED_DATA:-$ROOT/data/gpu_check}
FAKE_N=${GPU_CHECK_FAKE_N:-$(cpu_or_gpu 1000 40)}
FIT_EPOCHS=${GPU_CHECK_FIT_EPOCHS:-$(cpu_or_gpu 3 1)}
FIT_ARGS=${GPU_CHECK_FIT_ARGS-$(cpu_or_gpu "" "--trainer.limit_train_batches=2 --trainer.limit_val_batches=1 --trainer.limit_test_batches=1")}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu_check_work.$$}
ARCHIVE=${GPU_CHECK_ARCHIVE:-}
DEVICE=$(cpu_or_gpu cuda cpu)
ACCELERATOR=$(cpu_or_gpu gpu cpu)

# The output folder is emptied first, but only if it is one of ours (marker file) or empty.
if [[ -d $OUT_DIR && -n $(ls -A "$OUT_DIR" 2>/dev/null) && ! -f $OUT_DIR/.gpu_check ]]; then
    echo "gpu_check: $OUT_DIR exists and is not a gpu_check output folder; give another one" >&2
    exit 2
fi
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
touch "$OUT_DIR/.gpu_check"
STEPS_TSV=$OUT_DIR/steps.tsv
printf 'step\tstatus\trc\tseconds\tnote\n' >"$STEPS_TSV"

export PYTHONUNBUFFERED=1
# benchmarks/ for the fits' EpochTimer callback.
export PYTHONPATH=$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export PY OUT_DIR WORK DEVICE ACCELERATOR MODE ROOT WHEELS SITE DATA_MODE CARRIED_DATA FAKE_N BUILD

START=$(date +%s)
FAILURES=0

elapsed() { echo $(($(date +%s) - START)); }

# record NAME STATUS RC SECONDS NOTE
record() {
    local note=${5//$'\t'/ }
    note=${note//$'\n'/ }
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$note" >>"$STEPS_TSV"
    case $2 in FAIL | TIMEOUT | NOT_RUN) FAILURES=$((FAILURES + 1)) ;; esac
    printf '[%4ss] %-22s %-8s %s\n' "$(elapsed)" "$1" "$2" "$note"
}

selected() { [[ $STEPS == all || ,$STEPS, == *,$1,* ]]; }

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout` (the cap or what is
# left of the budget, whichever is less), output in OUT_DIR/NAME.log; sets STEP_RC.
# Returns 1 when the step did not run (not selected, or no time left).
STEP_RC=0
STEP_SECONDS=0
run_step() {
    local name=$1 cap=$2
    shift 2
    STEP_RC=-1
    STEP_SECONDS=0
    if ! selected "$name"; then
        record "$name" skip - 0 "not in GPU_CHECK_STEPS"
        return 1
    fi
    local left=$((BUDGET - $(elapsed)))
    if ((left < MIN_STEP)); then
        record "$name" NOT_RUN - 0 "budget of ${BUDGET}s used up"
        return 1
    fi
    local limit=$((cap < left ? cap : left))
    local log=$OUT_DIR/$name.log t0
    t0=$(date +%s%N)
    {
        echo "# $name (timeout ${limit}s): $*"
        echo
    } >"$log"
    timeout -k 10 "$limit" "$@" >>"$log" 2>&1
    STEP_RC=$?
    STEP_SECONDS=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    if ((STEP_RC == 124 || STEP_RC == 137)); then
        echo "# timed out after ${limit}s" >>"$log"
    fi
    return 0
}

# finish NAME [NOTE]: records the step from STEP_RC (0 pass, 124/137 TIMEOUT, else FAIL)
# and, on failure, shows the end of its log.
finish() {
    local name=$1 note=${2:-} status=pass
    if ((STEP_RC == 124 || STEP_RC == 137)); then
        status=TIMEOUT
    elif ((STEP_RC != 0)); then
        status=FAIL
    fi
    record "$name" "$status" "$STEP_RC" "$STEP_SECONDS" "$note"
    if [[ $status != pass ]]; then
        tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/    | /'
    fi
}

pytest_summary() { # the last "=== N passed, M skipped in Xs ===" line of a pytest log
    grep -E '^=+ .*(passed|failed|skipped|error|deselected|no tests ran).* in [0-9.]+s' "$1" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}

# ---------------------------------------------------------------------------
# The steps. Each one that runs under `timeout` is a function exported to `bash -c`.

step_env() {
    set -u # (a bash -c child: the options are not inherited)
    date -u '+date: %Y-%m-%dT%H:%M:%SZ'
    echo "mode: $MODE"
    echo "host: $(uname -srm), $(nproc) CPUs"
    echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none) ($(git -C "$ROOT" status --short 2>/dev/null | wc -l) changed files)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>&1
        nvidia-smi 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
    "$PY" - <<'EOF'
import os, platform, sys
import torch
print(f"python: {sys.executable} {platform.python_version()}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); cuda available: {torch.cuda.is_available()}")
from importlib import metadata
for name in ("pytorch-lightning", "torchmetrics", "jsonargparse", "optuna", "hypothesis", "pytest", "expecttest", "numpy"):
    try:
        print(f"{name}: {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name}: MISSING")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
elif os.environ["MODE"] == "gpu":
    sys.exit("no CUDA GPU visible to torch (GPU_CHECK_ALLOW_CPU=1 checks this script on CPU)")
EOF
}

step_wheels() {
    set -u
    mkdir -p "$SITE" &&
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl &&
        ls "$SITE"
}

step_data() {
    set -u
    "$PY" "$ROOT/benchmarks/gpu_check_util.py" data --work "$WORK/data" --carried "$CARRIED_DATA" --mode "$DATA_MODE" --fake-n "$FAKE_N"
}

step_build() {
    set -u
    if [[ $BUILD == 1 ]]; then
        if [[ $MODE == gpu ]]; then
            # This GPU's architecture only: one nvcc pass per file instead of two.
            if [[ -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
                TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))') || return 1
            fi
            export TORCH_CUDA_ARCH_LIST FORCE_CUDA=1
            # ptxas' register / shared memory / spill report lands in the build log.
            export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v"
        fi
        echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} FORCE_CUDA=${FORCE_CUDA:-} MAX_JOBS=$(nproc)"
        MAX_JOBS=$(nproc) "$PY" -m pip install -v --no-index --no-build-isolation --no-deps -e . || return 1
    else
        echo "GPU_CHECK_BUILD=0: the installed build is checked, not rebuilt"
    fi
    # A fresh interpreter, so the check sees the new build.
    "$PY" - <<'EOF'
import os, sys
import lightning_hw, torch
cuda = lightning_hw.has_cuda_kernels()
print(f"build: lightning_hw from {os.path.dirname(lightning_hw.__file__)}, has_cuda_kernels={cuda}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}")
if os.environ["MODE"] == "gpu" and not cuda:
    sys.exit("the extension was built without its CUDA kernels")
EOF
}

export -f step_env step_wheels step_data step_build

# pytest_step NAME CAP ARGS...: a pytest run with a JUnit file; notes its summary line.
pytest_step() {
    local name=$1 cap=$2
    shift 2
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
    run_step "$name" "$cap" "$PY" -m pytest -p no:cacheprovider --junitxml="$OUT_DIR/$name.xml" --durations=10 "$@" $PYTEST_ARGS || return 0
    local note
    note=$(pytest_summary "$OUT_DIR/$name.log")
    if ((STEP_RC == 5)); then
        STEP_RC=0 # pytest's "no tests collected": nothing of this kind exists yet
        note="no tests selected${note:+: $note}"
    elif ((STEP_RC == 0)) && [[ $MODE == gpu && $name == test_ops_cuda && $note != *passed* ]]; then
        STEP_RC=1 # on a GPU these must run, not skip
        note="nothing passed (all skipped?): $note"
    fi
    finish "$name" "$note"
}

fit_step() {
    local name=$1 config=$2 data=$3
    shift 3
    local extra=()
    # Generated data is small: hold out a fraction, not the config's 1,000 images.
    if [[ $data == cifar10 ]] && ! grep -q '^data: real' "$OUT_DIR/data.log" 2>/dev/null; then
        extra+=(--data.val_size=0.1)
    fi
    # shellcheck disable=SC2086  # FIT_ARGS is a list of words on purpose
    run_step "$name" 150 "$PY" -m lightning_hw fit --config "$config" \
        --trainer.accelerator="$ACCELERATOR" --trainer.devices=1 \
        --trainer.max_steps=-1 --trainer.max_epochs="$FIT_EPOCHS" \
        --trainer.default_root_dir="$OUT_DIR/$name" \
        --trainer.callbacks+=gpu_check_util.EpochTimer --trainer.enable_progress_bar=false \
        --data.data_dir="$WORK/data/$data" "${extra[@]}" "$@" $FIT_ARGS || return 0
    local accuracy epochs
    accuracy=$(grep -o 'test accuracy: [0-9.]*%' "$OUT_DIR/$name.log" | tail -n 1)
    epochs=$(grep -o 'gpu_check epoch=[^[:cntrl:]]*' "$OUT_DIR/$name.log" | sed -E 's/^gpu_check //; s/ device=.*//' | tr '\n' ';')
    finish "$name" "${accuracy:-no test accuracy}; ${epochs:-no epoch times}"
}

bench_step() {
    local name=$1
    shift
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    run_step "$name" 120 "$PY" benchmarks/bench_ops.py --device "$DEVICE" --markdown "$@" $BENCH_ARGS || return 0
    finish "$name" "$(grep '^| ' "$OUT_DIR/$name.log" | grep -vc '^| op shape') markdown rows"
}

# ---------------------------------------------------------------------------

echo "gpu_check: mode $MODE, python $PY, output $OUT_DIR, budget ${BUDGET}s"

if [[ $INSTALL_WHEELS != 1 ]]; then
    record wheels skip - 0 "GPU_CHECK_INSTALL_WHEELS=$INSTALL_WHEELS (CPU mode: the venv has the packages)"
elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    record wheels skip - 0 "no wheels in $WHEELS"
elif run_step wheels 120 bash -c step_wheels; then
    finish wheels "$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l) wheels into $SITE"
    ((STEP_RC == 0)) && export PYTHONPATH=$SITE:$PYTHONPATH
fi

if run_step env 60 bash -c step_env; then
    finish env "$(grep -E '^(torch|gpu):' "$OUT_DIR/env.log" | tr '\n' ' ')"
fi
if [[ $MODE == gpu ]] && selected env && ((STEP_RC != 0)); then
    NO_GPU=1 # without a GPU every later step would fail for that one reason
else
    NO_GPU=0
fi

if ((NO_GPU)); then
    record all-other-steps NOT_RUN - 0 "no GPU (see env.log)"
else
    if run_step data 120 bash -c step_data; then
        finish data "$(grep '^data:' "$OUT_DIR/data.log" | tail -n 1)"
    fi

    if run_step build 300 bash -c step_build; then
        finish build "$(grep '^build:' "$OUT_DIR/build.log" | sed -E 's/^build: //; s/lightning_hw from [^,]*, //')"
    fi

    pytest_step test_ops_cuda 240 tests/test_ops_cuda.py
    pytest_step test_cuda_marked 120 tests -m cuda --ignore=tests/test_ops_cuda.py
    pytest_step test_build 120 tests/test_build.py tests/test_nn.py::test_has_cuda_kernels_reflects_the_build

    bench_step bench_tf32_off
    if [[ $MODE == gpu ]]; then
        bench_step bench_tf32_on --tf32
    else
        record bench_tf32_on skip - 0 "TF32 is a CUDA setting (CPU mode)"
    fi

    fit_step fit_cifar10_twolayer configs/cifar10_twolayer.yaml cifar10 --data.download=false
    fit_step fit_fer2013_cnn_small configs/fer2013_cnn_small.yaml fer2013
fi

[[ -z ${GPU_CHECK_WORK:-} ]] && rm -rf "$WORK"

# ---------------------------------------------------------------------------
# Summary: the steps, then each result worth reading without the logs.

TOTAL=$(elapsed)
SUMMARY=$OUT_DIR/summary.txt
{
    echo "# gpu_check summary: $([[ $FAILURES == 0 ]] && echo PASS || echo "FAIL ($FAILURES steps)")"
    echo "mode $MODE; ${TOTAL}s of a ${BUDGET}s budget; output $OUT_DIR"
    echo
    echo "## Steps"
    column -t -s $'\t' "$STEPS_TSV" 2>/dev/null || cat "$STEPS_TSV"
    echo
    echo "## Environment"
    grep -E '^(date|mode|host|git|python|torch|gpu|pytorch-lightning|torchmetrics|jsonargparse|optuna|hypothesis|pytest|expecttest|numpy|nvidia-smi|name,|NVIDIA|Cuda|Build)' "$OUT_DIR/env.log" 2>/dev/null
    failed_tests=$(grep -hE '^(FAILED|ERROR) ' "$OUT_DIR"/test_*.log 2>/dev/null | head -n 40)
    if [[ -n $failed_tests ]]; then
        echo
        echo "## Failed tests (first 40)"
        echo "$failed_tests"
    fi
    # One section per bench / fit log: the lines that carry its results.
    bench_lines='^(# torch|\|).*'
    fit_lines='gpu_check epoch=[^[:cntrl:]]*|[a-z]+ accuracy: [^[:cntrl:]]*'
    for name_and_lines in "bench_tf32_off $bench_lines" "bench_tf32_on $bench_lines" \
        "fit_cifar10_twolayer $fit_lines" "fit_fer2013_cnn_small $fit_lines"; do
        name=${name_and_lines%% *}
        [[ -f $OUT_DIR/$name.log ]] || continue
        echo
        echo "## $name"
        grep -oE "${name_and_lines#* }" "$OUT_DIR/$name.log"
    done
} >"$SUMMARY"

if [[ -n $ARCHIVE ]]; then
    mkdir -p "$(dirname "$ARCHIVE")" &&
        tar -czf "$ARCHIVE" --exclude='*.ckpt' -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" ||
        echo "gpu_check: could not write $ARCHIVE" >&2
fi

echo
cat "$SUMMARY"
((FAILURES == 0))
