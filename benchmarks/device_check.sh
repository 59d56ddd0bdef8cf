#!/usr/bin/env bash
# The one script a session runs on a lent GPU (H100/H200): install with the machine's torch,
# build csrc, run the GPU tests and the quick benchmarks, write everything under $OUT.
#
#   bash benchmarks/device_check.sh [models] [ops] [more]   (default: models ops, stage limits add up to
#                                                         10.6 minutes, over one call's 10, though the
#                                                         H200 of 2026-11-29 ran `models` in 5.9 and
#                                                         `ops` in 2.3 (attention cut at 55 s); `more`,
#                                                         8.9 minutes with the install, is a call of
#                                                         its own)
#
# Each stage has its own time limit so one slow stage cannot eat the lease; the summary at the end
# says which stages passed. The golden cases and public YAMLs (shared/reference, 36 MB) must be there:
# ../shared does not travel to the device machine, a shared/ folder inside the checkout does, so first
#   mkdir -p shared && cp -r ../shared/reference shared/ && echo shared/ >>.git/info/exclude
# (mdm_fast.reference.data.reference_dir() looks inside the checkout first). Tables land in $OUT
# (benchmarks/results/ by default), every stage's full
# output in $OUT/log.txt; the device tool returns at most 8 files, so a call that writes more than
# 6 tables leaves them in $OUT/tables.tar.
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT=" ${*:-models ops} "
want() { [[ $WHAT == *" $1 "* ]]; }
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MDM_FAST_BENCH_OUT="$OUT"
PY=${PYTHON:-python3}
: >"$OUT/summary.txt"
note() {  # one summary line, written at once: a call cut by its limit keeps the stages before
  echo "$1" >>"$OUT/summary.txt"
}

stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${secs}s)"
  echo "=== $name" >>"$OUT/log.txt"
  timeout --kill-after=5 "$secs" "$@" 2>&1 | tee -a "$OUT/log.txt" >/tmp/stage.log  # a cut call keeps the log
  local rc=${PIPESTATUS[0]}
  tail -n 25 /tmp/stage.log
  note "$name: rc=$rc $((SECONDS - t0))s"
}

tests() {  # tests NAME SECONDS "FILES..." "FILES..." ...: one GPU pytest process per group, side by side
  # (the GPU tests are bound by Triton compiling on the host: 16 cores compile several groups at once)
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS i=0 pids=() rcs=""
  echo "=== $name (limit ${secs}s, $# groups side by side)"
  for group in "$@"; do
    # shellcheck disable=SC2086  # a group is a space-separated list of test files
    timeout --kill-after=5 "$secs" $PY -m pytest -q -m gpu --maxfail=10 --durations=5 -p no:cacheprovider \
      $group >"/tmp/tests$i.log" 2>&1 &
    pids+=($!); i=$((i + 1))
  done
  for j in "${!pids[@]}"; do
    wait "${pids[$j]}"; rcs+=" $?"
    { echo "=== $name group $j: ${*:$((j + 1)):1}"; cat "/tmp/tests$j.log"; } >>"$OUT/log.txt"
    tail -n 12 "/tmp/tests$j.log"
  done
  note "$name: rc=${rcs# } $((SECONDS - t0))s"
}

note "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
stage install 60 $PY -m pip install --no-build-isolation --no-deps -e .
note "mdm_fast at $($PY -c 'from benchmarks.common import revision; print(revision())' 2>&1 | tail -n 1)"
$PY -c "import mdm_fast._ext as e; print('mdm_fast._C:', e.ext is not None, e.load_error or '')"
# the golden cases: without them the reference tests stop at collection and the models suite has no config
$PY -c "from mdm_fast.reference.data import reference_dir as r; assert (r() / 'golden' / 'index.json').is_file(), r()" \
  || note "NO shared/reference: copy ../shared/reference into the checkout's shared/ (see the header)"

# Most important first: a stage cut by the lease still leaves the earlier tables (the models suite
# rewrites its table after each workload).
if want models; then
  # the attention file compiles every autotune candidate at three shapes and two dtypes, with and without
  # a text mask (~4 minutes in one process with the mask only): split in five; the group norm's GPU cases
  # compile ~270 kernels (104 s in one process on a 2-core CPU machine, compile only): split in four, its
  # matrix by dtype; the small ops' files run their CPU matrix on CUDA too (the device fixture): a group each
  gna=tests/test_group_norm_act.py att=tests/test_attention.py
  # 150 s cut two groups (the resample file, the attention layout/compile/fp32 group) when all of them ran
  # side by side on the H200 of 2026-11-29; alone they took 134 and 118 s
  tests gpu-tests 190 tests/test_fast_model.py tests/test_runners.py tests/test_precompile.py \
    "tests/test_train.py tests/test_cli.py tests/test_samplers.py" \
    "$gna::test_gpu_input_bias $gna::test_gpu_model_shapes $gna::test_gpu_runs_on_the_current_stream $gna::test_gpu_weight_none_and_split_path $gna::test_gpu_more_than_2_31_elements" \
    "$gna::test_gpu_matches_reference -k dtype0" "$gna::test_gpu_matches_reference -k dtype1" \
    "$gna::test_gpu_matches_reference -k dtype2" "$gna::test_gpu_plan_knobs" \
    tests/test_concat.py tests/test_diffusion_ops.py tests/test_bias_add.py \
    tests/test_resample_ops.py \
    "$att::test_gpu_error_bounded_by_torch_lowprec -k dtype0" \
    "$att::test_gpu_error_bounded_by_torch_lowprec -k dtype1" \
    "$att::test_every_hopper_autotune_candidate_is_correct -k cmask" \
    "$att::test_every_hopper_autotune_candidate_is_correct -k nomask" \
    "$att::test_gpu_layout_fused $att::test_gpu_compile_and_cuda_graph $att::test_gpu_fp32_matches_oracle"
  stage bench-models 240 $PY -m benchmarks.models --suite quick --out "$OUT"  # 200 s cut the 1024 train step
fi
if want ops; then
  # attention: the unmasked-text rows compile each kernel's 3-4 candidates a second time; the table is
  # rewritten after each section (55 s ended it after level 1's forward on the H200 of 2026-11-29)
  stage bench-attention 90 $PY -m benchmarks.attention --suite quick --out "$OUT"
  stage bench-group-norm 55 $PY -m benchmarks.group_norm --suite quick --out "$OUT"  # rewritten per section
fi
if want more; then  # what holds each step back first (the profiles against the floor, the train step's
  # memory), then the group-norm plan sweep and the op suites measured in an earlier lease
  stage profile-model 60 $PY -m benchmarks.profile_model --kind forward --batch 32 --out "$OUT"
  stage profile-train 75 $PY -m benchmarks.profile_model --kind train --batch 16 --out "$OUT"
  stage profile-forward-b2 55 $PY -m benchmarks.profile_model --kind forward --batch 2 --out "$OUT"
  stage memory-train 45 $PY -m benchmarks.memory --gpu --out "$OUT"
  # the knobs changed since the last lease first (the rest: --sweep without --knobs)
  stage sweep-group-norm 150 $PY -m benchmarks.group_norm --sweep --out "$OUT" \
    --knobs PIPELINE_STAGES,LANE_ACCUMULATORS,WHOLE_ROWS_BELOW_CHANNELS,MAX_REGISTERS
  stage bench-resample 40 $PY -m benchmarks.resample --suite quick --out "$OUT"
  stage bench-diffusion-step 30 $PY -m benchmarks.diffusion_step --suite quick --out "$OUT"
fi
echo "=== summary"
cat "$OUT/summary.txt"
# the device tool brings back at most 8 files: past that, the tables come back as one archive
tables=("$OUT"/*.md)
if [[ ! $OUT -ef benchmarks/results && -e ${tables[0]} ]] && (( ${#tables[@]} + 2 > 8 )); then
  tar -C "$OUT" -cf "$OUT/tables.tar" "${tables[@]##*/}" && rm -f "${tables[@]}" && echo "tables in $OUT/tables.tar"
fi
