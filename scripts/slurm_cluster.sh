#!/usr/bin/env bash
# Bring up / tear down a real one-node Slurm cluster on this machine, for tests
# that submit jobs (e.g. job arrays through submitit).
#
# Usage:
#   scripts/slurm_cluster.sh start STATE_DIR   # prints `export SLURM_CONF=...` on stdout
#   scripts/slurm_cluster.sh stop  STATE_DIR
#
# Typical use:
#   eval "$(scripts/slurm_cluster.sh start /tmp/slurm)"   # or: . /tmp/slurm/env.sh
#   sbatch --wrap 'hostname' ...
#   scripts/slurm_cluster.sh stop /tmp/slurm
#
# Assumptions: Debian 12, running as root, no systemd as PID 1 (daemons are
# started directly). All Slurm state, logs and pid files live under STATE_DIR;
# the config is STATE_DIR/slurm.conf, so clients need SLURM_CONF exported.
# Only the `export SLURM_CONF=...` line goes to stdout; progress goes to stderr.
#
# `stop` only kills processes whose pids this script recorded under STATE_DIR
# (and only if the pid still belongs to a process of the expected name).
set -euo pipefail

log() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() {
    echo "usage: $0 {start|stop} STATE_DIR" >&2
    exit 2
}

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

# pid_alive PID NAME: true if PID is a live process whose command name is NAME
# (guards against the pid having been reused by something else).
pid_alive() {
    local pid=$1 name=$2 comm
    [[ -n $pid ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]]
}

# read_pid PIDFILE: print the pid recorded in PIDFILE (empty if none).
read_pid() { if [[ -r $1 ]]; then tr -dc '0-9' <"$1" || true; fi; }

# stop_proc PIDFILE NAME: SIGTERM the recorded process, wait up to ~20 s for
# it to exit, then SIGKILL. Removes the pid file. Never fails.
stop_proc() {
    local pidfile=$1 name=$2 pid i
    pid=$(read_pid "$pidfile")
    if ! pid_alive "$pid" "$name"; then
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" "$name" || break
        sleep 0.2
    done
    if pid_alive "$pid" "$name"; then
        log "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$pidfile"
}

# --------------------------------------------------------------------------
# Step 1: packages
# --------------------------------------------------------------------------
ensure_packages() {
    local missing=()
    local cmd
    for cmd in sbatch slurmctld slurmd munged; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if ((${#missing[@]})); then
        log "missing ${missing[*]}; installing slurm-wlm and munge"
        local apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge)
        # apt-get output goes to stderr so stdout stays eval-able.
        if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2; then
            log "install failed; running apt-get update and retrying"
            apt-get update -q >&2
            DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2
        fi
    fi
    # shellcheck disable=SC2016 # ${Package} is dpkg-query's format, not bash's
    log "installed: $(dpkg-query -W -f='${Package} ${Version}, ' slurm-wlm slurmctld slurmd slurm-client munge 2>/dev/null | sed 's/, $//')"
}

# --------------------------------------------------------------------------
# Step 2: munge
# --------------------------------------------------------------------------
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ensure_munge() {
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating munge key $key"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$key" --force
        elif command -v create-munge-key >/dev/null 2>&1; then
            create-munge-key -f
        else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"

    # munged's socket/pid dir; /run is a tmpfs so it may be gone after a reboot.
    install -d -o munge -g munge -m 0755 /run/munge
    # munged refuses to start if its log/lib dirs are not owned by munge.
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge

    if munge_works; then
        # Someone (e.g. a previous run whose state dir is gone, or the system)
        # already runs a working munged: reuse it, but do not claim it.
        log "munged already running and working; reusing it (not ours to stop)"
        return 0
    fi

    log "starting munged (as user munge)"
    # Debian's unit runs munged as the unprivileged `munge` user; do the same.
    # munged daemonises itself and writes /run/munge/munged.pid.
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s /run/munge/munged.pid ]] && munge_works && break
        sleep 0.2
    done
    [[ -s /run/munge/munged.pid ]] || die "munged did not write /run/munge/munged.pid (see /var/log/munge/munged.log)"
    # Record it as ours so `stop` may kill it.
    cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    munge_works || die "munge -n | unmunge fails (see /var/log/munge/munged.log)"
    log "munge OK"
}

# --------------------------------------------------------------------------
# Step 3: slurm.conf
# --------------------------------------------------------------------------
write_config() {
    local host cpus mem_total real_mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    # Leave ~10% (at least 256 MB) for the OS so slurmd does not drain the
    # node for having less memory than configured.
    real_mem=$((mem_total - (mem_total / 10 > 256 ? mem_total / 10 : 256)))
    ((real_mem > 0)) || real_mem=1

    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool" "$STATE_DIR/log"

    cat >"$STATE_DIR/slurm.conf" <<EOF
# Generated by scripts/slurm_cluster.sh -- one-node test cluster.
ClusterName=invariance-test
# Everything talks over loopback.
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ReturnToService=2
# No mail on this box; avoids "Configured MailProg is invalid" in the log.
MailProg=/bin/true

# No cgroups: plain process tracking, no task containment or accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none

SchedulerType=sched/backfill
SelectType=select/cons_tres
# CR_CPU: schedule individual CPUs (not whole cores), memory not consumable,
# so two 1-CPU jobs / array tasks run side by side on 2 CPUs.
SelectTypeParameters=CR_CPU

# State, spool, logs and pid files all under the state dir.
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd.log
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldDebug=info
SlurmdDebug=info

# Short timeouts so start/stop/cancel are quick.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
WaitTime=0
# Keep finished jobs visible (squeue/scontrol) for 5 minutes.
MinJobAge=300

NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF

    printf 'export SLURM_CONF=%s\n' "$STATE_DIR/slurm.conf" >"$STATE_DIR/env.sh"
}

# Optional sacct stand-in, written to STATE_DIR/bin/sacct but NOT put on PATH.
# Without slurmdbd the real sacct fails ("Slurm accounting storage is
# disabled"), so submitit reports every job as UNKNOWN and waits forever on a
# job that ended without writing its result (scancel, time limit, crash).
# Prepending STATE_DIR/bin to PATH makes submitit's one query,
#   sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
# answered from squeue, which keeps finished jobs for MinJobAge seconds.
write_sacct_shim() {
    mkdir -p "$STATE_DIR/bin"
    cat >"$STATE_DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in (from scripts/slurm_cluster.sh): answers
#   sacct -o F1,F2,... --parsable2 -j ID [-j ID ...]
# from `squeue -t all`. Fields: JobID, State, NodeList, JobName, Partition.
set -euo pipefail
fields="JobID,State,JobName,Partition"
header=1
ids=()
while (($#)); do
    case $1 in
        -o | --format) fields=$2; shift 2 ;;
        --format=*) fields=${1#*=}; shift ;;
        -j | --jobs) IFS=, read -ra more <<<"$2"; ids+=("${more[@]}"); shift 2 ;;
        --jobs=*) IFS=, read -ra more <<<"${1#*=}"; ids+=("${more[@]}"); shift ;;
        -n | --noheader) header=0; shift ;;
        -p | -P | --parsable | --parsable2 | -X | --allocations) shift ;;
        *) echo "sacct shim: unsupported option $1" >&2; exit 1 ;;
    esac
done
IFS=, read -ra names <<<"$fields"
fmt=""
for f in "${names[@]}"; do
    case ${f,,} in
        jobid) c=%i ;; state) c=%T ;; nodelist) c=%N ;; jobname) c=%j ;; partition) c=%P ;;
        *) echo "sacct shim: unsupported field $f" >&2; exit 1 ;;
    esac
    fmt+="${fmt:+|}$c"
done
if ((header)); then (IFS='|'; echo "${names[*]}"); fi
# Unknown (or already purged) ids make squeue fail: ask one id at a time.
for id in "${ids[@]}"; do
    squeue -t all -h -o "$fmt" -j "$id" 2>/dev/null || true
done
EOF
    chmod 0755 "$STATE_DIR/bin/sacct"
}

# --------------------------------------------------------------------------
# Step 4: slurm daemons
# --------------------------------------------------------------------------
dump_logs() {
    local f
    for f in "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log"; do
        log "---- last 30 lines of $f ----"
        tail -n 30 "$f" >&2 2>/dev/null || log "(no $f)"
    done
}

# port_busy PORT: true if something accepts TCP connections on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurm() {
    local conf=$STATE_DIR/slurm.conf
    export SLURM_CONF=$conf

    # The ports are fixed (6817 slurmctld, 6818 slurmd): a cluster started
    # with another STATE_DIR would answer our sinfo and fake success.
    local port
    for port in 6817 6818; do
        if port_busy "$port"; then
            die "port $port already in use (another Slurm cluster running? stop it first)"
        fi
    done

    log "starting slurmctld"
    # -i: ignore state save errors on first start. Daemonises by default.
    slurmctld -f "$conf" -i || { dump_logs; die "slurmctld failed to start"; }
    log "starting slurmd"
    slurmd -f "$conf" || { dump_logs; die "slurmd failed to start"; }

    log "waiting for the node to become idle"
    local i state=""
    for ((i = 0; i < 120; i++)); do
        state=$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    # Make sure it is really our daemons that answered.
    if ! pid_alive "$(read_pid "$STATE_DIR/slurmctld.pid")" slurmctld ||
        ! pid_alive "$(read_pid "$STATE_DIR/slurmd.pid")" slurmd; then
        log "slurmctld or slurmd from $STATE_DIR is not running"
        state=dead
    fi
    if [[ $state != idle ]]; then
        log "node state is '${state:-<none>}' after 60 s"
        dump_logs
        cmd_stop # do not leave half a cluster behind
        exit 1
    fi
    log "cluster up: $(sinfo -h -o '%P %D %T %c CPUs' | head -n 1)"
}

# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------
cmd_stop() {
    # Cancel whatever still runs on this cluster first: slurmstepd and job
    # processes outlive slurmd, so they would otherwise be left behind.
    if pid_alive "$(read_pid "$STATE_DIR/slurmctld.pid")" slurmctld && [[ -f $STATE_DIR/slurm.conf ]]; then
        export SLURM_CONF=$STATE_DIR/slurm.conf
        if [[ -n $(squeue -h -o %i 2>/dev/null || true) ]]; then
            log "cancelling remaining jobs"
            scancel --partition=debug 2>/dev/null || true
            local i
            for ((i = 0; i < 60; i++)); do # KillWait=5, so this is quick
                [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_proc "$STATE_DIR/slurmd.pid" slurmd
    stop_proc "$STATE_DIR/slurmctld.pid" slurmctld
    stop_proc "$STATE_DIR/munged.pid" munged
    log "stopped"
}

cmd_start() {
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    # Idempotent: tear down whatever an earlier start with this dir left running.
    cmd_stop
    ensure_packages
    ensure_munge
    write_config
    write_sacct_shim
    start_slurm
    log "start took $((SECONDS - t0)) s"
    cat "$STATE_DIR/env.sh"
}

(($# == 2)) || usage
STATE_DIR=$2
[[ $STATE_DIR == /* ]] || STATE_DIR=$PWD/$STATE_DIR
STATE_DIR=${STATE_DIR%/}
[[ $(id -u) == 0 ]] || die "must run as root"
export PATH="$PATH:/usr/sbin:/sbin"

case $1 in
    start) cmd_start ;;
    stop) cmd_stop ;;
    *) usage ;;
esac
