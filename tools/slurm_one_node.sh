#!/usr/bin/env bash
# A real one-node SLURM on this machine (Debian's slurm-wlm and munge), for tests/test_slurm.py and for trying
# BACKEND=slurm: `bash tools/slurm_one_node.sh` installs, configures (one CPU partition, "cpu", of this host's
# CPUs and memory; no cgroups; requeue allowed) and starts munged, slurmctld and slurmd as root, then waits until
# the node is idle; `bash tools/slurm_one_node.sh stop` stops them. Needs root. The daemons run at nice 10 and
# log little, so that they take next to nothing from the runs.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm-one-node

PIDS=("$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid)  # the daemons this script starts

stop() {  # by their pid files, each daemon this script started
    local pid left=()
    for file in "${PIDS[@]}"; do
        [[ -s $file ]] && pid=$(cat "$file") && kill "$pid" 2>/dev/null || true
    done
    for file in "${PIDS[@]}"; do
        [[ -s $file ]] || continue
        pid=$(cat "$file")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then left+=("$pid"); else rm -f "$file"; fi
    done
    [[ ${#left[@]} == 0 ]] || { echo "slurm_one_node.sh: still running: ${left[*]}" >&2; return 1; }
}

if [[ "${1:-start}" == stop ]]; then stop; exit; fi
[[ "${1:-start}" == start ]] || { echo "usage: bash tools/slurm_one_node.sh [start|stop]" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "slurm_one_node.sh: needs root (it installs packages and starts daemons)" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "slurm_one_node.sh: SLURM is not installed and there is no apt-get" \
        "to install it (Debian's slurm-wlm and munge)" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurm-wlm munge
fi

host=$(hostname -s)
cpus=$(nproc --all)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # 10% left to the system
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge
cat > "$CONF" <<CONF
# written by tools/slurm_one_node.sh for $host
ClusterName=onenode
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=error
SlurmdDebug=error
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

stop >/dev/null 2>&1 || true
[[ -s /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
runuser -u munge -- nice -n 10 munged
nice -n 10 slurmctld -c   # -c: forget the jobs and node states of a previous start (one killed before its stop)
nice -n 10 slurmd
for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]]; then
        echo "slurm_one_node.sh: $host idle in partition cpu ($cpus CPUs, $mem_mb MB)"; exit 0
    fi
    sleep 1
done
echo "slurm_one_node.sh: the node did not become idle in 60 s: $(sinfo -N 2>&1 | tr '\n' ' ')" \
     "(see /var/log/slurm/)" >&2
exit 1
