#!/bin/bash
# Submit the whole K-Forcing pipeline as a chain of Slurm jobs, each started only when the one
# before it succeeded (--dependency=afterok); a failed stage cancels every later one
# (--kill-on-invalid-dep=yes), so nothing waits forever on a broken chain.
#
#   slurm/submit_pipeline.sh [options] CONFIG RUN_DIR [kforcing-dist args for every stage...]
#
#   prepare_data -> train_teacher -> distill k1 -> k2 -> k4 -> evaluate (report.md / report.json)
#
# Options:
#   --stages "1 2 4"    distillation stages, in order (keep it equal to distill.stages)
#   --shards DIR        token shards already prepared in DIR: no prepare-data job
#   --sbatch "OPTS"     extra sbatch options for every job, e.g. "--partition=gpu --account=lm"
#   --train-sbatch "OPTS"  extra sbatch options for the teacher and distill jobs, e.g.
#                       "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --time=12:00:00"
# Prints one "STAGE JOB_ID" line per job; job logs go to RUN_DIR/slurm-logs/ (%x-%j.out).
# The jobs run in the current folder: relative CONFIG and RUN_DIR paths resolve from here.
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2; exit 2; }

stages="1 2 4"
shards=""
sbatch_all=""
sbatch_train=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --stages) stages=${2:?--stages needs a value}; shift 2 ;;
        --shards) shards=${2:?--shards needs a folder}; shift 2 ;;
        --sbatch) sbatch_all=${2:?--sbatch needs options}; shift 2 ;;
        --train-sbatch) sbatch_train=${2:?--train-sbatch needs options}; shift 2 ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "submit_pipeline.sh: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || usage
config=$1
run_dir=$2
shift 2
[[ -f "$config" ]] || { echo "submit_pipeline.sh: config file $config not found" >&2; exit 2; }
for k in $stages; do
    [[ "$k" =~ ^[1-9][0-9]*$ ]] || { echo "submit_pipeline.sh: --stages takes numbers like \"1 2 4\", got '$k'" >&2; exit 2; }
done
command -v sbatch >/dev/null || { echo "submit_pipeline.sh: sbatch not found: run this on a Slurm login node" >&2; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export KFORCING_DIST_SLURM_DIR=${KFORCING_DIST_SLURM_DIR:-$here}
logs="$run_dir/slurm-logs"
mkdir -p "$logs"
data_dir=${shards:-$run_dir/data}
read -r -a opts_all <<< "$sbatch_all"
read -r -a opts_train <<< "$sbatch_train"

submitted=()
previous=""
# submit NAME SCRIPT [sbatch options...] -- [script args...]: chain one job after the previous one.
submit() {
    local name=$1 script=$2
    shift 2
    local -a sbopts=()
    while [[ "$1" != -- ]]; do sbopts+=("$1"); shift; done
    shift
    local -a dep=()
    [[ -z "$previous" ]] || dep=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    local out
    if ! out=$(sbatch --parsable --job-name="kf-$name" --output="$logs/%x-%j.out" "${dep[@]}" \
            "${opts_all[@]}" "${sbopts[@]}" "$here/$script" "$@"); then
        echo "submit_pipeline.sh: submitting $name failed; cancelling the jobs already submitted: ${submitted[*]:-none}" >&2
        [[ ${#submitted[@]} -eq 0 ]] || scancel "${submitted[@]}"
        exit 1
    fi
    previous=${out%%;*}
    submitted+=("$previous")
    echo "$name $previous"
}

if [[ -z "$shards" ]]; then
    submit data prepare_data.sbatch -- "$config" -o "$run_dir" --set "data.shards_dir=$data_dir" "$@"
fi
submit teacher train_teacher.sbatch "${opts_train[@]}" -- "$config" -o "$run_dir/teacher" \
    --set "data.shards_dir=$data_dir" "$@"
for k in $stages; do
    submit "k$k" distill.sbatch "${opts_train[@]}" -- "$config" --stage "k$k" -o "$run_dir" \
        --set "data.shards_dir=$data_dir" "$@"
done
submit evaluate evaluate.sbatch -- "$config" -o "$run_dir" --set "data.shards_dir=$data_dir" "$@"
