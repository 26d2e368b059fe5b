# Shared body of the batch scripts in slurm/ (sourced, not submitted): run one `kforcing-dist`
# command on every task of the allocation with srun, forward the stop warning to the tasks, and
# requeue the job when they saved and stopped early, so the rerun resumes where they stopped.
#
# Environment it reads:
#   KFORCING_DIST_CMD          the entry point, word-split (default: kforcing-dist), e.g.
#                              "python -m kforcing_dist" with PYTHONPATH pointing at a checkout
#   KFORCING_DIST_REQUEUE      1 (default): requeue after a resumable early stop (exit 3); 0: don't
#   KFORCING_DIST_MAX_RESTARTS stop requeueing after this many restarts of one job (default 20)
# Exit codes are the command's: 0 done, 2 bad input, 3 saved and stopped early (rerun resumes).

readonly KF_EXIT_STOPPED_EARLY=3

kf_log() {
    echo "[$(date -u +%FT%TZ) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*" >&2
}

kf_die() {
    kf_log "error: $*"
    exit 2
}

# The stop warning (`#SBATCH --signal=B:USR1@N`, `scancel --signal=USR1 --batch`) reaches only this
# shell; the tasks learn of it from here. srun forwards USR1 to every task; each sets a flag, the
# ranks agree at the next step boundary, save a checkpoint together and exit with code 3.
kf_forward_stop() {
    kf_stop_signal=$1
    if [[ -n "${kf_srun_pid:-}" ]] && kill -0 "$kf_srun_pid" 2>/dev/null; then
        kf_log "received SIG$1: asking the tasks to save and stop at the next step boundary"
        kill -USR1 "$kf_srun_pid" 2>/dev/null || true
    else
        kf_log "received SIG$1 before the tasks started"
    fi
}

# kf_run SUBCOMMAND ARGS...: srun the command on every task and handle an early stop.
kf_run() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || kf_die "not inside a Slurm job: submit this script with sbatch"
    local -a cmd
    read -r -a cmd <<< "${KFORCING_DIST_CMD:-kforcing-dist}"
    command -v "${cmd[0]}" >/dev/null || kf_die "entry point '${cmd[0]}' not found on PATH; install the \
package (pip install -e .) or set KFORCING_DIST_CMD, e.g. KFORCING_DIST_CMD='python -m kforcing_dist'"
    # Slurm >= 22.05 no longer passes --cpus-per-task from sbatch to srun by itself.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
    fi
    kf_stop_signal=""
    kf_srun_pid=""
    trap 'kf_forward_stop USR1' USR1
    # TERM: time limit, scancel, preemption or `scontrol requeue`; the tasks get their own TERM
    # from Slurm, which sets the same flag. Forward it anyway (it is idempotent for the tasks).
    trap 'kf_forward_stop TERM' TERM
    kf_log "srun ${cmd[*]} $* (${SLURM_NTASKS:-1} tasks on ${SLURM_JOB_NODELIST:-?})"
    # In the background: bash runs a trap only between commands, so a foreground srun would hold
    # the signal until the tasks had finished on their own.
    srun "${cmd[@]}" "$@" &
    kf_srun_pid=$!
    local rc
    while true; do
        wait "$kf_srun_pid"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; srun is still running.
        kill -0 "$kf_srun_pid" 2>/dev/null || break
    done
    kf_log "tasks exited with code $rc"
    if (( rc == KF_EXIT_STOPPED_EARLY )) && [[ "$kf_stop_signal" != TERM ]]; then
        kf_requeue
    fi
    return "$rc"
}

# After a signal (USR1) or the train.time_budget_minutes budget the tasks saved a complete
# checkpoint and exited 3: put the job back in the queue; the rerun (SLURM_RESTART_COUNT + 1)
# runs the same command, which resumes from that checkpoint. Needs `#SBATCH --requeue`; the log
# continues in the same file with `#SBATCH --open-mode=append`.
kf_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${KFORCING_DIST_MAX_RESTARTS:-20}
    if [[ "${KFORCING_DIST_REQUEUE:-1}" != 1 ]]; then
        kf_log "stopped early; not requeueing (KFORCING_DIST_REQUEUE=${KFORCING_DIST_REQUEUE}): resubmit to resume"
    elif (( restarts >= max )); then
        kf_log "stopped early after $restarts restarts (KFORCING_DIST_MAX_RESTARTS=$max): not requeueing again"
    else
        kf_log "stopped early with a saved checkpoint: requeueing job $SLURM_JOB_ID to resume"
        # Slurm answers a requeue with TERM to this script; nothing is left to forward.
        trap '' TERM USR1
        scontrol requeue "$SLURM_JOB_ID" || kf_log "scontrol requeue failed: resubmit the same command to resume"
    fi
}
