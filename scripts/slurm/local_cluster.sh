#!/usr/bin/env bash
# A private one-node SLURM cluster on this machine, to run the project's sbatch script for real.
#
#   scripts/slurm/local_cluster.sh install      # apt-get install slurm-wlm when absent (exit 3 if impossible)
#   scripts/slurm/local_cluster.sh start DIR    # start munged, slurmctld and slurmd; writes DIR/env
#   scripts/slurm/local_cluster.sh stop DIR     # cancel its jobs, stop its daemons
#   scripts/slurm/local_cluster.sh run CMD...   # install, start in a temporary folder, run CMD, stop
#                                               # (the folder is kept, for its logs, when CMD fails)
#
# Everything lives in DIR: slurm.conf, the munge key and socket, state, spool, logs and pid files.
# The daemons listen on free ports above 20000 (not 6817/6818) and use their own munge socket, so a
# system SLURM or munge on the machine is not touched. Commands reach the cluster through SLURM_CONF:
# `source DIR/env` (what `run` does for CMD), then sbatch/squeue/scancel as usual. The node has
# UNIPAIR_SLURM_CPUS CPUs (default: the machine's, at least 2) and one partition, `debug`.
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none: no cgroups (containers often have none).
set -euo pipefail

die() { echo "local_cluster: $*" >&2; exit 1; }
DAEMONS=(slurmd slurmctld munged)

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null; then
    return 0
  fi
  local sudo=()
  if [[ $(id -u) != 0 ]]; then
    if ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
      echo "local_cluster: slurm-wlm is not installed and installing it needs root (or sudo)" >&2
      exit 3
    fi
    sudo=(sudo -n)
  fi
  command -v apt-get >/dev/null \
    || { echo "local_cluster: slurm-wlm is not installed and there is no apt-get to install it" >&2; exit 3; }
  echo "local_cluster: installing slurm-wlm with apt-get"
  # Under systemd the package starts the system's munge (and tries slurmd/slurmctld, which need an
  # /etc/slurm/slurm.conf); the private cluster uses none of them. In a container nothing starts.
  if ! { "${sudo[@]}" apt-get update -q && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install \
    -y -q --no-install-recommends slurm-wlm; } >/tmp/unipair-slurm-apt.log 2>&1; then
    tail -5 /tmp/unipair-slurm-apt.log >&2
    echo "local_cluster: apt-get install slurm-wlm failed (log: /tmp/unipair-slurm-apt.log)" >&2
    exit 3
  fi
}

free_port() {  # a port in 20000-39999 that nothing listens on
  local port
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  die "no free port found"
}

start() {
  local dir=$1
  [[ -e $dir/slurm.conf ]] && die "$dir already holds a cluster (stop it first)"
  mkdir -p "$dir"/{munge,state,spool,log}
  dir=$(cd "$dir" && pwd)
  chmod 700 "$dir" "$dir/munge"
  local user host cpus
  user=$(id -un)
  host=$(hostname -s)
  cpus=${UNIPAIR_SLURM_CPUS:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=unipair-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
KillWait=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  printf 'export SLURM_CONF=%q\n' "$dir/slurm.conf" >"$dir/env"
  export SLURM_CONF=$dir/slurm.conf

  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || die "munged did not start (log: $dir/log/munged.log)"
  slurmctld -f "$dir/slurm.conf" || die "slurmctld did not start (log: $dir/log/slurmctld.log)"
  slurmd -f "$dir/slurm.conf" -N "$host" || die "slurmd did not start (log: $dir/log/slurmd.log)"
  local state=""
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [[ $state == idle ]] && { echo "local_cluster: up (SLURM_CONF=$SLURM_CONF, $cpus CPUs)"; return 0; }
    sleep 0.5
  done
  tail -5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  die "the node did not become idle within 30 s (state: ${state:-no answer}; logs in $dir/log)"
}

stop() {
  local dir=$1 name pid
  [[ -f $dir/slurm.conf ]] || return 0
  export SLURM_CONF=$dir/slurm.conf
  # Jobs first (slurmd ends their steps), then the daemons by their pid files.
  if scancel --user "$(id -un)" 2>/dev/null; then
    for _ in $(seq 40); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.5
    done
  fi
  for name in "${DAEMONS[@]}"; do
    [[ -f $dir/$name.pid ]] || continue
    pid=$(cat "$dir/$name.pid")
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$dir"/*.pid "$dir/slurm.conf"
}

run() {
  install
  local dir status=0
  dir=$(mktemp -d /tmp/unipair-slurm.XXXXXX)
  # shellcheck disable=SC2064
  trap "stop '$dir'" EXIT
  trap 'exit 130' INT TERM
  start "$dir"
  # shellcheck disable=SC1091
  source "$dir/env"
  "$@" || status=$?
  stop "$dir"
  if [[ $status == 0 ]]; then
    rm -rf "$dir"
  else
    echo "local_cluster: $1 failed ($status); logs in $dir/log" >&2
  fi
  return "$status"
}

case ${1:-} in
  install) install ;;
  start) [[ $# == 2 ]] || die "usage: $0 start DIR"; install; start "$2" ;;
  stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
  run) shift; [[ $# -gt 0 ]] || die "usage: $0 run CMD..."; run "$@" ;;
  *) echo "usage: $0 install | start DIR | stop DIR | run CMD..." >&2; exit 2 ;;
esac
