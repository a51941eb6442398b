#!/usr/bin/env bash
# slurm_cluster.sh - start/stop a throw-away single-node SLURM cluster on this machine.
#
# Why: saelab's SLURM integration (sbatch submission, requeue on preemption,
# USR2/SIGTERM "time is almost up" handling) needs a real slurmctld + slurmd to
# be tested honestly.  This script gives the tests and CI one on localhost:
# one node (this host, `hostname -s`, real CPU count and memory), one partition
# `debug` (default, no time limit), no accounting, no cgroups, requeue enabled.
#
# Usage (as root, Debian; there is no systemd, so daemons are started directly):
#   scripts/slurm_cluster.sh install   # apt-get slurm-wlm + munge (skipped if present)
#   scripts/slurm_cluster.sh start     # munge key, munged, slurm.conf, slurmctld, slurmd; waits for idle node
#   scripts/slurm_cluster.sh status    # exit 0 iff sinfo answers and the node is idle/mixed/allocated
#   scripts/slurm_cluster.sh stop      # stop slurmd, slurmctld, munged (and any job slurmstepd)
#
# How the tests use it: CI runs `install` then `start` before pytest and `stop`
# afterwards; SLURM-marked tests call `status` (or `sinfo`) and skip when it fails,
# so a developer machine without SLURM still passes.  `start` is idempotent and
# by default wipes old job state (SLURM_KEEP_STATE=1 keeps it), so every run
# begins with an empty queue.
#
# Notes for test writers (SLURM 22.05 semantics):
#   * `scancel --signal=USR2 JOB` signals job *steps* only; to reach the batch
#     script itself use `scancel --batch --signal=USR2 JOB` (or --full).
#   * Likewise `#SBATCH --signal=USR2@30` signals steps only; a batch script that
#     traps the signal needs `#SBATCH --signal=B:USR2@30`.
#   * bash runs a trap only after the foreground command returns: use
#     `sleep N & wait $!` rather than `sleep N` in scripts that trap signals.
#   * The time-limit check runs about every 30 s, so a `@30` warning arrives
#     30-60 s before the limit, and `--time=1` jobs are killed up to ~30 s late.

set -euo pipefail  # fail fast on errors, unset variables and broken pipes

CONF_DIR=/etc/slurm                    # Debian's slurm-wlm reads its config from here
CONF="$CONF_DIR/slurm.conf"            # the one config file we generate
CTLD_PID=/run/slurmctld.pid            # pid files let `stop` kill exactly our daemons
SLURMD_PID=/run/slurmd.pid             # (same, for slurmd)
MUNGE_PID=/run/munge/munged.pid        # munged's default pid file location
MUNGE_KEY=/etc/munge/munge.key         # shared secret munge signs credentials with
LOG_DIR=/var/log/slurm                 # daemon logs, useful when a CI run fails
STATE_DIR=/var/spool/slurmctld         # slurmctld's StateSaveLocation
SPOOL_DIR=/var/spool/slurmd            # slurmd's SlurmdSpoolDir (job scripts live here)
WAIT_S="${SLURM_START_TIMEOUT:-30}"    # bounded wait for the node to become usable
NODE="$(hostname -s)"                  # slurmd identifies its node by the short hostname

log() { echo "slurm_cluster: $*" >&2; }           # all chatter to stderr, prefixed so CI logs are readable
die() { log "ERROR: $*"; exit 1; }                # one clear line, non-zero exit

need_root() {                                     # every action touches /etc, /run and daemons
  [ "$(id -u)" -eq 0 ] || die "must run as root"  # fail early with a clear message instead of EPERM later
}

pid_alive() {                                     # true if the pid file names a live process
  local f="$1" p                                  # $1 = pid file path
  [ -s "$f" ] || return 1                         # no/empty pid file: not running (as far as we know)
  p="$(cat "$f" 2>/dev/null)" || return 1         # unreadable pid file: treat as not running
  [ -n "$p" ] && kill -0 "$p" 2>/dev/null         # signal 0 only tests existence
}

installed() {                                     # true when every binary we need is on PATH
  local b                                         # loop variable
  for b in munged munge slurmctld slurmd sinfo sbatch scontrol; do  # daemons + the client tools tests call
    command -v "$b" >/dev/null || return 1        # any one missing: not (fully) installed
  done
}

cmd_install() {  # `install`: bring in the Debian packages
  need_root                                       # apt-get needs root
  if installed; then                              # skip the slow apt round-trip on a warm machine
    log "slurm-wlm and munge already installed ($(slurmd -V))"  # slurmd -V needs no slurm.conf
    return 0                                      # idempotent: nothing to do
  fi
  local made_policy=0                             # remember whether we created policy-rc.d
  if [ ! -e /usr/sbin/policy-rc.d ]; then         # no systemd: postinst would try init scripts and may fail
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d  # 101 = "action forbidden": packages don't start daemons
    chmod 755 /usr/sbin/policy-rc.d               # invoke-rc.d only honours an executable policy
    made_policy=1                                 # so we remove it again afterwards
  fi
  export DEBIAN_FRONTEND=noninteractive           # never prompt (CI has no stdin)
  local rc=0                                      # collect apt's status without tripping set -e
  apt-get update -qq >/dev/null \
    || log "warning: apt-get update failed; trying the existing package lists"  # a fresh CI machine has stale/no lists
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || rc=$?  # quiet: only errors shown
  if [ "$made_policy" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi  # restore the machine's policy as it was
  [ "$rc" -eq 0 ] || die "apt-get could not install slurm-wlm and munge (exit $rc)"  # one clear line on failure
  installed || die "slurm-wlm/munge installed but munged/slurmctld/slurmd/sinfo not found on PATH"  # sanity check: packages present but binaries missing
  log "installed $(slurmd -V)"                    # report the version for the CI log (needs no slurm.conf)
}

munge_ok() {                                      # true if munged answers with a valid credential
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1  # round-trip through the socket proves key + daemon work
}

start_munge() {  # make munged run with a valid key (slurm auth depends on it)
  install -d -o munge -g munge -m 0700 /etc/munge      # key dir must not be world-readable or munged refuses
  if [ ! -s "$MUNGE_KEY" ]; then                       # create a key once; reuse it afterwards
    if command -v mungekey >/dev/null; then            # munge >= 0.5.14 ships a key generator
      mungekey --create --keyfile="$MUNGE_KEY" --force # 1024-byte random key
    else  # no mungekey binary
      dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none  # fallback for older munge
    fi
  fi
  chown munge:munge "$MUNGE_KEY"                       # munged runs as munge and must own its key
  chmod 0400 "$MUNGE_KEY"                              # munged rejects group/other-readable keys
  install -d -o munge -g munge -m 0755 /run/munge      # socket + pid dir; /run is tmpfs so recreate each boot
  install -d -o munge -g munge -m 0700 /var/lib/munge  # munged's seed file lives here
  install -d -o munge -g munge -m 0700 /var/log/munge  # munged's log file lives here
  if munge_ok; then                                    # already running (idempotent start)
    return 0                                           # nothing more to do
  fi
  if pid_alive "$MUNGE_PID"; then                      # running but broken (e.g. key changed): restart it
    kill "$(cat "$MUNGE_PID")" 2>/dev/null || true     # ask it to exit
    sleep 1                                            # give it a moment to remove its socket
  fi
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock  # stale socket from a killed munged blocks startup
  runuser -u munge -- munged --force                   # as munge user (never root); --force tolerates leftovers
  local i                                              # loop counter
  for i in $(seq 1 20); do                             # bounded wait: up to ~10 s for the socket
    munge_ok && return 0                               # ready
    sleep 0.5                                          # poll gently
  done
  die "munged did not start (see /var/log/munge/munged.log)"  # bounded wait expired: fail with a pointer to the log
}

select_type() {                                        # cons_tres exists since 19.05; fall back if not shipped
  local d                                              # candidate plugin dir
  for d in /usr/lib/x86_64-linux-gnu/slurm-wlm /usr/lib/*/slurm-wlm /usr/lib/slurm-wlm /usr/lib/slurm /usr/lib64/slurm; do  # Debian multiarch path first, then other layouts
    [ -e "$d/select_cons_tres.so" ] && { echo select/cons_tres; return; }  # preferred (GRES-aware)
  done
  echo select/cons_res                                 # older installs only have cons_res
}

write_conf() {                                         # print the slurm.conf for this machine to stdout
  local cpus mem_total mem                             # machine facts
  cpus="$(nproc)"                                      # CPUs this machine (or container) really gives us
  mem_total="$(free -m | awk '/^Mem:/{print $2}')"     # total memory in MB
  mem=$(( mem_total * 95 / 100 ))                      # a bit below total, else slurmd drains the node ("Low RealMemory")
  local mem_per_cpu=$(( mem / cpus ))                  # default share: without it a job takes ALL memory and jobs serialize
  cat <<EOF  # unquoted EOF: expand machine values below
# Generated by scripts/slurm_cluster.sh - single-node test cluster; do not edit by hand.
ClusterName=saelab  # name shown by tools; no accounting DB needs it
SlurmctldHost=${NODE}(127.0.0.1)  # controller on this host, reached via loopback (no DNS needed)
SlurmUser=root  # controller runs as root: no slurm-owned dirs to fix up
SlurmdUser=root  # slurmd must be root to launch jobs
AuthType=auth/munge  # munge signs every RPC
SlurmctldPort=6817  # default port, stated explicitly
SlurmdPort=6818  # default port, stated explicitly
StateSaveLocation=${STATE_DIR}  # controller state (job queue)
SlurmdSpoolDir=${SPOOL_DIR}  # node spool (batch scripts)
SlurmctldPidFile=${CTLD_PID}  # lets stop kill exactly this daemon
SlurmdPidFile=${SLURMD_PID}  # same for slurmd
SlurmctldLogFile=${LOG_DIR}/slurmctld.log  # logs for debugging CI failures
SlurmdLogFile=${LOG_DIR}/slurmd.log  # same for slurmd
SlurmctldDebug=info  # enough detail without noise
SlurmdDebug=info  # same for slurmd
MailProg=/bin/true  # no mail on this machine; silence --mail-type
MpiDefault=none  # jobs here are plain processes
ProctrackType=proctrack/linuxproc  # tracks job processes via /proc, no cgroups needed
TaskPlugin=task/none  # no CPU binding / cgroup confinement
JobAcctGatherType=jobacct_gather/none  # no accounting
AccountingStorageType=accounting_storage/none  # no slurmdbd (so no sacct)
SchedulerType=sched/backfill  # standard scheduler
SelectType=$(select_type)  # allocate individual cores and memory
SelectTypeParameters=CR_Core_Memory  # cores + memory are consumable: jobs can share the node
DefMemPerCPU=${mem_per_cpu}  # fair default share so 1-CPU jobs run side by side
ReturnToService=2  # a DOWN node returns as soon as slurmd registers
SlurmdParameters=config_overrides  # trust our CPUs/RealMemory over detected topology (no drain on mismatch)
JobRequeue=1  # batch jobs may be requeued (scontrol requeue, node failure)
PreemptType=preempt/partition_prio  # needed for PreemptMode=REQUEUE (preempt/none rejects it)
PreemptMode=REQUEUE  # preempted jobs are requeued, not cancelled
MinJobAge=300  # finished jobs stay visible in scontrol/squeue for 5 min
KillWait=30  # seconds between SIGTERM and SIGKILL at time limit/cancel
NodeName=${NODE} NodeAddr=127.0.0.1 NodeHostname=${NODE} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN  # this machine, real CPU count and memory
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO  # the single default partition
EOF
}

node_state() {                                         # our node's state as sinfo prints it, flags stripped
  sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-' || true  # '*' = not responding etc.
}

cmd_start() {  # `start`: bring up munged, slurmctld, slurmd; wait for an idle node
  need_root                                            # daemons, /etc and /run need root
  installed || die "slurm/munge not installed; run: $0 install"  # clear hint instead of 'command not found'
  start_munge                                          # slurm authenticates every RPC through munge
  install -d -m 0755 "$CONF_DIR" "$LOG_DIR"            # config and log dirs
  install -d -m 0700 "$STATE_DIR" "$SPOOL_DIR"         # SlurmUser=root owns state; keep job scripts private
  local tmp changed=0                                  # new config candidate; did it change?
  tmp="$(mktemp)"                                      # write aside first so a running cluster sees no half file
  write_conf > "$tmp"                                  # render for the current machine
  if ! cmp -s "$tmp" "$CONF"; then                     # only replace (and restart) when it really changed
    install -m 0644 "$tmp" "$CONF"                     # world-readable: client tools (sinfo, sbatch) read it too
    changed=1                                          # running daemons must pick it up
  fi
  rm -f "$tmp"                                         # tidy the temp file
  if [ "$changed" -eq 1 ] && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then  # restart only daemons that are actually running
    log "slurm.conf changed; restarting slurm daemons"  # a node/CPU change needs a real restart, not reconfigure
    stop_slurm                                         # munged may stay up
  fi
  if ! pid_alive "$CTLD_PID"; then                     # idempotent: start the controller only if it's not up
    local cflag="-c"                                   # default: clear old jobs so tests start from an empty queue
    [ "${SLURM_KEEP_STATE:-0}" = 1 ] && cflag=""       # opt-in: keep queued jobs across restarts
    slurmctld -i $cflag                                # daemonizes itself; -i ignores unreadable old state
  fi
  if ! pid_alive "$SLURMD_PID"; then                   # idempotent: start the node daemon only if it's not up
    slurmd                                             # daemonizes itself (runs as root to launch jobs as any user)
  fi
  local i st=""                                        # loop counter; node state
  for i in $(seq 1 $(( WAIT_S * 2 ))); do              # bounded wait: WAIT_S seconds at 0.5 s steps
    st="$(node_state)"                                 # ask the controller
    case "$st" in  # react to what the controller reports
      idle|mixed|allocated|completing) break ;;        # usable
      down|drained|draining|drain|fail|failing)        # came up unusable (old state, reboot reason ...)
        scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;  # make it usable; retry next round
    esac
    sleep 0.5                                          # poll gently
  done
  case "$st" in  # final verdict after the bounded wait
    idle|mixed|allocated|completing) log "cluster up: node $NODE is $st ($(slurmd -V))" ;;  # success
    *) die "node $NODE not usable after ${WAIT_S}s (state '${st:-no answer}'); see $LOG_DIR/*.log" ;;  # timed out: fail with a pointer to the logs
  esac
}

kill_pidfile() {                                       # TERM the daemon in a pid file, wait, then KILL
  local f="$1" p i                                     # $1 = pid file
  pid_alive "$f" || { rm -f "$f"; return 0; }          # nothing to do; drop a stale pid file
  p="$(cat "$f")"                                      # the daemon's pid
  kill -TERM "$p" 2>/dev/null || true                  # polite shutdown first (saves state)
  for i in $(seq 1 20); do                             # bounded wait: up to ~10 s
    kill -0 "$p" 2>/dev/null || break                  # gone
    sleep 0.5                                          # poll gently
  done
  kill -KILL "$p" 2>/dev/null || true                  # still there: force it
  rm -f "$f"                                           # daemons may leave their pid file behind
}

kill_name() {                                          # fallback for daemons whose pid file was lost
  local n="$1" i                                       # $1 = exact process name
  pgrep -x "$n" >/dev/null || return 0                 # none running
  pkill -TERM -x "$n" || true                          # exact name match only, never -f
  for i in $(seq 1 10); do                             # bounded wait: up to ~5 s
    pgrep -x "$n" >/dev/null || return 0               # gone
    sleep 0.5                                          # poll gently
  done
  pkill -KILL -x "$n" || true                          # force whatever is left
}

stop_slurm() {                                         # slurm daemons and job step daemons, not munge
  kill_pidfile "$SLURMD_PID"                           # node daemon first so it doesn't spam a gone controller
  kill_pidfile "$CTLD_PID"                             # then the controller (saves state on TERM)
  kill_name slurmd                                     # strays without pid file (e.g. started by hand)
  kill_name slurmctld                                  # same for the controller
  kill_name slurmscriptd                               # slurmctld's script helper, should it outlive its parent
  kill_name slurmstepd                                 # per-job step daemons of jobs still running
}

cmd_stop() {  # `stop`: leave no daemon behind
  need_root                                            # killing root daemons needs root
  stop_slurm                                           # slurm first: it needs munge while shutting down
  kill_pidfile "$MUNGE_PID"                            # then munged
  kill_name munged                                     # and any munged without pid file
  rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock  # so the next start doesn't see a dead socket
  local left="" n                                      # names of anything still alive; loop variable
  for n in slurmd slurmctld slurmscriptd slurmstepd munged; do      # one exact name at a time (pgrep -x caps patterns at 15 chars)
    pgrep -x "$n" >/dev/null && left="$left $n"        # remember survivors
  done
  [ -z "$left" ] || die "processes still running after stop:$left"  # never claim success falsely
  log "cluster stopped"                                # confirm for the CI log
}

cmd_status() {  # `status`: exit 0 iff the cluster answers and the node can run jobs
  command -v sinfo >/dev/null || { log "sinfo not installed"; return 1; }  # no SLURM at all
  local st                                             # node state
  st="$(node_state)"                                   # empty when the controller doesn't answer
  case "$st" in  # only these states can accept jobs
    idle|mixed|allocated|completing) echo "$NODE $st"; return 0 ;;  # usable cluster
    *) log "cluster not usable (node $NODE state '${st:-no answer}')"; return 1 ;;  # down/drained/no controller
  esac
}

case "${1:-}" in                                       # dispatch on the sub-command
  install) cmd_install ;;  # packages
  start) cmd_start ;;  # bring the cluster up
  stop) cmd_stop ;;  # tear it down
  status) cmd_status ;;  # health check for tests
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;  # usage error
esac
