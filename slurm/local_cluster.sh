#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, from Debian's packages: for the tests and
# for trying slurm/sweep.sbatch.
#   sudo slurm/local_cluster.sh          # install if needed, configure, start; a node that
#                                        # already answers is left as it is
#   sudo slurm/local_cluster.sh fresh    # the same, but a cluster this script started before
#                                        # is shut down and started again with no job, job id
#                                        # or state from earlier runs (what the tests use)
#   slurm/local_cluster.sh stop          # stop the daemons it started
# Needs root (apt, daemons). State, spool and logs go under $DELO_SLURM_DIR. Exits 77 (the
# usual "skipped" status) when it cannot install or start as it is: not root, no apt-get,
# no package mirror; 1 when a started cluster does not come up.
set -euo pipefail
DIR=${DELO_SLURM_DIR:-/var/tmp/delo-slurm}
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)

MARK="# written by delo_dist slurm/local_cluster.sh"
die() { echo "local_cluster.sh: $*" >&2; exit 1; }
cannot() { echo "local_cluster.sh: $*" >&2; exit 77; }

if [[ ${1:-start} == stop ]]; then
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    exit 0
fi

node_up() { sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; }
ours() { [[ -f $CONF ]] && head -1 "$CONF" | grep -qF "$MARK"; }
if command -v sinfo >/dev/null && [[ -f $CONF ]] && node_up; then
    if [[ ${1:-start} != fresh ]]; then
        echo "slurm: node $NODE is up"; exit 0
    fi
    ours || cannot "a Slurm cluster configured elsewhere ($CONF) is running: not restarting it"
    [[ $(id -u) == 0 ]] || cannot "needs root to restart the cluster"
    # A cluster left by an earlier run: shut it down (slurmctld and every slurmd) and start
    # again from empty state, so job ids, queued or requeued jobs and old settings go with it.
    echo "slurm: restarting the cluster an earlier run left up"
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 100); do
        { scontrol ping 2>/dev/null | grep -q "is UP"; } || break
        sleep 0.2
    done
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do   # daemons that missed the shutdown
        [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 1
fi
[[ $(id -u) == 0 ]] || cannot "needs root (apt-get and the Slurm daemons)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || cannot "apt-get not found: install slurmctld slurmd slurm-client munge by hand"
    echo "slurm: installing slurmctld slurmd slurm-client munge from Debian"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || cannot "apt-get update failed (no package mirror reachable?)"
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || cannot "apt-get install slurmctld slurmd slurm-client munge failed"
fi

# munge: the authentication daemon every Slurm RPC goes through; runs as user munge.
[[ -s /etc/munge/munge.key ]] || mungekey -c -k /etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n >/dev/null 2>&1 || die "munged did not start (see /var/log/munge/munged.log)"
fi

# One node, all its cores; memory a little below the total so slurmd does not drain it.
[[ ${1:-start} == fresh ]] && rm -rf "$DIR/state" "$DIR/spool"   # no job ids carried over
mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
MEM=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
cat > "$CONF" <<EOF
$MARK: a single-node test cluster
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$NODE CPUs=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# Restart cleanly: daemons from an earlier configuration would not see this one.
for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
    [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null && sleep 1 || true
done
slurmctld -c   # -c: forget jobs of an earlier cluster in this state dir
slurmd
for _ in $(seq 60); do node_up && break; sleep 0.5; done
node_up || { scontrol update nodename="$NODE" state=resume 2>/dev/null || true; sleep 1; }
node_up || die "node $NODE did not come up: see $DIR/slurmctld.log and $DIR/slurmd.log"
echo "slurm: node $NODE is up ($(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPUs, ${MEM} MiB)"
