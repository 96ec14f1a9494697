#!/usr/bin/env bash
# The GPU check of optimum-vim, made for one call on a bare CUDA machine (its own torch / triton / transformers, no
# network). It installs the project (pip install --no-deps -e .) and any carried wheels, then runs each stage under
# `timeout`, writing to $OUT (or --out):
#
#   env      nvidia-smi, versions, the install                                                  -> env.json
#   kernels  the Triton kernel tests compiled on CUDA against their PyTorch references (the tests call the kernels
#            directly or under use_kernels("triton"), so nothing falls back silently) and the GPU-path tests
#   e2e      benchmarks/gpu_e2e.py: every recipe calibrated on CUDA, reloaded, compared, rerun   -> e2e.json
#            and the learned recipes rerun under torch.use_deterministic_algorithms              -> e2e_det.json
#   bench    benchmarks/gpu_kernels.py tables (Vim-S first, then T and B; what the budget allows) -> bench.json, .md
#   calib    (not a default stage) PTQ4VM W4A4 timed on a Vim-S-shaped model (2 of 24 blocks)    -> calib.json
#   tune     (not a default stage) benchmarks/gpu_kernels.py --tune                              -> tuned.json
#   always   check.log (everything printed) and summary.md (stage results and the tables)
#
# The default stages take at most 350 s (under 6 minutes, leaving room for a rerun in 15 minutes of device time).
#
#   bash benchmarks/gpu_check.sh                      # on the device machine
#   bash benchmarks/gpu_check.sh --stages env,calib,tune   # calibration timing + launch-config sweep (<= 6.2 min)
#   bash benchmarks/gpu_check.sh --dry-run            # anywhere (CI): checks everything up to the launch
#
# Options: --wheels DIR (default .whl: wheels to carry, filled by benchmarks/gpu_prep.sh), --data DIR (default
# .gpu-data: Fashion-MNIST test files, same script), --out DIR (default $OUT, else gpu_check_out), --stages LIST
# (default env,kernels,e2e,bench), --tune-seconds N (default 150), --budget STAGE=SECONDS (a stage's timeout; the
# defaults: env 40, kernels 100, e2e 90, e2e_det 25, bench 95, calib 120). $PYTHON names the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
DRY=0
WHEELS=.whl
DATA=.gpu-data
OUTDIR=${OUT:-gpu_check_out}
STAGES=env,kernels,e2e,bench
TUNE_SECONDS=150
declare -A BUDGET=([env]=40 [kernels]=100 [e2e]=90 [e2e_det]=25 [bench]=95 [calib]=120 [tune]=0)
KERNEL_TESTS=(tests/kernels/test_gemm.py tests/kernels/test_scan.py tests/ops/test_dispatch.py
              tests/modules/test_dynamic_outliers.py tests/kernels/test_tuning.py tests/ops/test_gpu_path.py)
# left out there: the CLI test calibrates on Fashion-MNIST through `datasets`; the tune smoke test is interpreter-only
KERNEL_SELECT=(-m "not aot" -k "not test_cli_quantizes_and_evaluates and not test_tune_smoke")
NEEDED_FILES=(pyproject.toml setup.py checkpoints/vim-fashion-mnist/model.safetensors benchmarks/gpu_e2e.py
              benchmarks/gpu_kernels.py benchmarks/gpu_check_helpers.py benchmarks/accuracy.py "${KERNEL_TESTS[@]}")

die() { echo "gpu_check.sh: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS=$2; shift ;;
        --data) [ $# -ge 2 ] || die "--data needs a folder"; DATA=$2; shift ;;
        --out) [ $# -ge 2 ] || die "--out needs a folder"; OUTDIR=$2; shift ;;
        --stages) [ $# -ge 2 ] || die "--stages needs a list"; STAGES=$2; shift ;;
        --tune-seconds) [ $# -ge 2 ] || die "--tune-seconds needs a number"; TUNE_SECONDS=$2; shift ;;
        --budget) [[ "${2:-}" =~ ^(env|kernels|e2e|e2e_det|bench|calib)=[0-9]+$ ]] \
                      || die "--budget takes STAGE=SECONDS (stages env, kernels, e2e, e2e_det, bench, calib)"
                  BUDGET[${2%%=*}]=${2#*=}; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) die "unknown option '$1' (options: --dry-run --wheels --data --out --stages --tune-seconds --budget)" ;;
    esac
    shift
done
[[ "$TUNE_SECONDS" =~ ^[0-9]+$ ]] && [ "$TUNE_SECONDS" -ge 10 ] || die "--tune-seconds must be a whole number >= 10"
BUDGET[tune]=$((TUNE_SECONDS + 60))  # the sweep stops itself at its budget; the rest: start-up and the last shape
IFS=, read -r -a STAGE_LIST <<< "$STAGES"
TOTAL=0
for s in "${STAGE_LIST[@]}"; do
    case "$s" in env|kernels|e2e|bench|calib|tune) ;; *) die "unknown stage '$s' (stages: env,kernels,e2e,bench,calib,tune)" ;; esac
    TOTAL=$((TOTAL + BUDGET[$s]))
    [ "$s" = e2e ] && TOTAL=$((TOTAL + BUDGET[e2e_det]))
done
has_stage() { [[ ",$STAGES," == *",$1,"* ]]; }
for f in "${NEEDED_FILES[@]}"; do [ -f "$f" ] || die "missing $f (run from an optimum-vim checkout)"; done
command -v "$PY" > /dev/null || die "no $PY on PATH (set PYTHON)"
command -v timeout > /dev/null || die "coreutils timeout is needed to bound each stage"
mkdir -p "$OUTDIR" || die "cannot create the output folder $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/check.log

main() {
    local start
    start=$(date +%s)
    echo "gpu_check.sh: stages $STAGES (budget $TOTAL s), wheels $WHEELS, data $DATA, out $OUTDIR, python $PY"
    WHEEL_FILES=()
    if [ -d "$WHEELS" ]; then
        shopt -s nullglob
        WHEEL_FILES=("$WHEELS"/*.whl)
        shopt -u nullglob
        "$PY" benchmarks/gpu_check_helpers.py wheels "${WHEEL_FILES[@]}" \
            || die "the wheels in $WHEELS cannot install on the device (see above)"
    else
        echo "  no wheel folder $WHEELS: the device's own packages only (without datasets the CLI check is skipped)"
    fi
    DATA_ARGS=()
    if [ -f "$DATA/fashion-mnist/t10k-images-idx3-ubyte.gz" ] && [ -f "$DATA/fashion-mnist/t10k-labels-idx1-ubyte.gz" ]
    then
        DATA_ARGS=(--data "$DATA")
        echo "  data: Fashion-MNIST test files in $DATA/fashion-mnist"
    else
        echo "  no Fashion-MNIST in $DATA/fashion-mnist: e2e uses random images (no top-1)"
    fi
    local e2e=("$PY" benchmarks/gpu_e2e.py "${DATA_ARGS[@]}" --out "$OUTDIR/e2e.json")
    local e2e_det=("$PY" benchmarks/gpu_e2e.py "${DATA_ARGS[@]}" --deterministic --recipes ptq4vm vimvq
                   --rerun ptq4vm vimvq --no-cli --out "$OUTDIR/e2e_det.json")
    local kernels=("$PY" -m pytest -q -p no:cacheprovider -rfE "${KERNEL_SELECT[@]}" "${KERNEL_TESTS[@]}")
    local bench=("$PY" benchmarks/gpu_kernels.py --models small tiny base --batches 1 64 --json "$OUTDIR/bench.json"
                 --markdown "$OUTDIR/bench.md")
    local calib=("$PY" benchmarks/gpu_e2e.py --ptq4vm-vim-s --out "$OUTDIR/calib.json")
    local tune=("$PY" benchmarks/gpu_kernels.py --tune --tune-models small tiny base --tune-seconds "$TUNE_SECONDS"
                --tune-out "$OUTDIR/tuned.json")
    local env=(bash -c 'set -e; py=$1; out=$2; shift 2
        if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
        if [ $# -gt 0 ]; then
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@"
        fi
        PIP_NO_INDEX=1 "$py" -m pip install -q --no-deps --no-build-isolation -e . \
            || echo "editable install failed: running from the source tree (PYTHONPATH)"
        "$py" benchmarks/gpu_check_helpers.py env "$out/env.json"' _ "$PY" "$OUTDIR" "${WHEEL_FILES[@]}")
    # the source tree on the path too: the same files as the editable install, and the fallback when it fails
    export PYTHONPATH=$(pwd):$(pwd)/kernels${PYTHONPATH:+:$PYTHONPATH}

    if [ "$DRY" = 1 ]; then
        echo "dry run: what the stages need, checked without a GPU"
        "$PY" -c "import torch, triton, transformers, safetensors, accelerate, optimum_vim, optimum_vim_kernels.tuning
print('  imports: torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__,
      '| optimum_vim', optimum_vim.__version__)" || die "the stack or optimum_vim does not import"
        "${e2e[@]}" --dry-run || die "benchmarks/gpu_e2e.py --dry-run failed"
        "${e2e_det[@]}" --dry-run || die "benchmarks/gpu_e2e.py --deterministic --dry-run failed"
        "${bench[@]}" --dry-run || die "benchmarks/gpu_kernels.py --dry-run failed"
        "${calib[@]}" --dry-run || die "benchmarks/gpu_e2e.py --ptq4vm-vim-s --dry-run failed"
        "${tune[@]}" --dry-run || die "benchmarks/gpu_kernels.py --tune --dry-run failed"
        local collected
        collected=$("$PY" -m pytest --collect-only -q -p no:cacheprovider "${KERNEL_SELECT[@]}" "${KERNEL_TESTS[@]}" \
                    2>&1) || die "the kernel tests do not collect: $(echo "$collected" | tail -5)"
        echo "  kernel tests: $(echo "$collected" | tail -1)"
        echo "stages, each under timeout:"
        for s in "${STAGE_LIST[@]}"; do
            case "$s" in
                env) echo "  env (${BUDGET[env]} s): ${#WHEEL_FILES[@]} wheel(s) -> /tmp/site; pip install --no-deps -e .;" \
                          "benchmarks/gpu_check_helpers.py env" ;;
                kernels) echo "  kernels (${BUDGET[kernels]} s): ${kernels[*]} [-n 8 with pytest-xdist]" ;;
                e2e) echo "  e2e (${BUDGET[e2e]} s): ${e2e[*]}"; echo "  e2e_det (${BUDGET[e2e_det]} s): ${e2e_det[*]}" ;;
                bench) echo "  bench (${BUDGET[bench]} s): ${bench[*]}" ;;
                calib) echo "  calib (${BUDGET[calib]} s): ${calib[*]}" ;;
                tune) echo "  tune (${BUDGET[tune]} s): ${tune[*]}" ;;
            esac
        done
        "$PY" benchmarks/gpu_check_helpers.py summary "$OUTDIR" "dry-run=ok=0" > /dev/null
        local call="bash benchmarks/gpu_check.sh"
        [ "$STAGES" = env,kernels,e2e,bench ] || call="$call --stages $STAGES"
        echo "dry run OK. Device call: run(command=\"$call\", carry=[\"$WHEELS\", \"$DATA\"]," \
             "timeout_s=$((TOTAL + 90)))"
        return 0
    fi

    [ "${#WHEEL_FILES[@]}" -gt 0 ] && export PYTHONPATH=/tmp/site:$PYTHONPATH  # where the env stage puts them
    local results=() failed=0
    run_stage() {  # name budget command...
        local name=$1 budget=$2 t0 rc result
        shift 2
        echo; echo "=== stage $name (budget $budget s): $*"
        t0=$(date +%s)
        timeout --signal=TERM --kill-after=10 "$budget" "$@"
        rc=$?
        case $rc in
            0) result=ok ;;
            124|137) result="timed out after $budget s" ;;
            *) result="failed (exit $rc)" ;;
        esac
        [ "$result" = ok ] || failed=1
        results+=("$name=$result=$(( $(date +%s) - t0 ))")
        echo "=== stage $name: $result in $(( $(date +%s) - t0 )) s"
        [ "$result" = ok ]
    }
    if has_stage env && ! run_stage env "${BUDGET[env]}" "${env[@]}"; then
        echo "the environment stage failed: the other stages need the install and a GPU; stopping"
    else
        local xdist=()
        "$PY" -c "import xdist" 2> /dev/null && xdist=(-n 8)
        has_stage kernels && run_stage kernels "${BUDGET[kernels]}" "${kernels[@]}" "${xdist[@]}"
        if has_stage e2e; then
            run_stage e2e "${BUDGET[e2e]}" "${e2e[@]}"
            run_stage e2e_det "${BUDGET[e2e_det]}" "${e2e_det[@]}"
        fi
        has_stage bench && run_stage bench "${BUDGET[bench]}" "${bench[@]}"
        has_stage calib && run_stage calib "${BUDGET[calib]}" "${calib[@]}"
        has_stage tune && run_stage tune "${BUDGET[tune]}" "${tune[@]}"
    fi
    echo; echo "gpu_check.sh: $(( $(date +%s) - start )) s in all"
    "$PY" benchmarks/gpu_check_helpers.py summary "$OUTDIR" "${results[@]}"
    return $failed
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
