#!/usr/bin/env bash
# A SLURM cluster on this machine, with job accounting and two nodes, for testing
# the pipeline's SLURM profile (workflow/profiles/slurm) and its multi-node launch.
#
#   tests/cluster/slurm-localhost.sh start    # installs what is missing (apt-get), starts the daemons
#   tests/cluster/slurm-localhost.sh install [PACKAGE...]  # only installs, with other Debian packages
#                                             # in the same apt-get run (.ci/run: the browser, sshd)
#   tests/cluster/slurm-localhost.sh status   # exit 0 when every daemon runs and both nodes are usable
#   tests/cluster/slurm-localhost.sh stop     # cancels the jobs, stops the daemons
#
# Root only, Debian (or Ubuntu). Each command is idempotent. Nothing runs under
# systemd: munged, mariadbd, slurmdbd, slurmctld and slurmd are started directly
# and stopped through their pid files. Every file lives in the state folder
# ($CONMH_SLURM_STATE, default /var/lib/conmh-slurm): configuration in etc/,
# logs in log/, pid files and sockets in run/, the database in mysql/.
# SLURM's commands find the configuration where they look by default:
# /etc/slurm/slurm.conf is made a symbolic link to etc/slurm.conf while the
# cluster runs (`start` refuses to replace a slurm.conf that is not its own).
# SLURM_CONF alone would not do: the Snakemake plugin's job step removes SLURM_*
# variables before it calls srun.
#
# The cluster "conmh" has two nodes, both on this host: two slurmd daemons
# (Debian's slurmd supports several per host, each with its own port) named
# `hostname -s` and `hostname -s`-2, each with half of the CPUs (at least 2) and
# half of the memory (minus a margin). Two nodes let a job span nodes
# (`--nodes=2`), as a multi-node training run does; two CPUs each let two such
# one-CPU-per-node jobs run at once. Partitions "debug" (the default), "cpu" and
# "gpu" hold both nodes (no GPU is configured: "gpu" only lets a profile's
# partition choice be checked). Accounts: "root" (root's default) and "conmh".
# Accounting (slurmdbd with MariaDB) is what `sacct` reads, and the Snakemake
# executor plugin tracks jobs with `sacct`.
set -euo pipefail

STATE=${CONMH_SLURM_STATE:-/var/lib/conmh-slurm}
CLUSTER=conmh
ACCOUNT=conmh
PARTITIONS=(debug cpu gpu)
# Ports of this cluster's daemons: not SLURM's or MySQL's defaults, so that they do not collide with
# daemons the system may run.
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16820
SLURMD_PORTS=(16821 16822)
HOST=$(hostname -s)
NODES=("$HOST" "$HOST-2")
PACKAGES=(munge mariadb-server mariadb-client slurmctld slurmd slurmdbd slurm-client procps)  # procps: ps

ETC=$STATE/etc
RUN=$STATE/run
LOG=$STATE/log
export SLURM_CONF=$ETC/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket
DB_SOCKET=$RUN/mysqld.sock

say() { echo "slurm-localhost: $*" >&2; }
die() { say "error: $*"; exit 1; }

# ---------------------------------------------------------------- installation

missing_packages() {  # missing_packages [PACKAGE...]: the cluster's packages and these, where not installed
    local pkg
    for pkg in "${PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

install_packages() {  # install_packages [PACKAGE...]
    local missing
    missing=$(missing_packages "$@")
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found; install these packages yourself: $missing"
    [ "$(id -u)" -eq 0 ] || die "run as root to install $(echo $missing) with apt-get"
    mkdir -p "$LOG"
    say "installing $(echo $missing)"
    # Keep the packages' maintainer scripts from starting system-wide daemons.
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
    fi
    local status=0
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing; } \
        > "$STATE/log/apt.log" 2>&1 || status=$?
    [ -n "$policy" ] && rm -f "$policy"
    [ "$status" -eq 0 ] || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get failed (log: $STATE/log/apt.log)"; }
}

# ---------------------------------------------------------------- processes

# A daemon that exited stays a zombie until its parent reaps it (here init, which may take seconds):
# kill -0 still finds it, ps shows its state Z.
alive() {  # alive PID: the process exists and has not exited
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ $state != Z* ]]
}

pid_of() {  # the pid in run/$1.pid when that process is alive
    local file=$RUN/$1.pid pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    alive "$pid" || return 1
    echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within ${seconds}s (logs: $LOG/)"
}

stop_daemon() {
    local name=$1 pid i
    pid=$(pid_of "$name") || { rm -f "$RUN/$name.pid"; return 0; }
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "$name (pid $pid) ignored SIGTERM for 30s; killing it"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/$name.pid"
    say "stopped $name"
}

# ---------------------------------------------------------------- configuration

CHANGED=()  # configuration files that start replaced

install_file() {  # install_file MODE PATH < content: replace PATH only when the content changed
    local mode=$1 path=$2 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat > "$tmp"
    chmod "$mode" "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$path"
        CHANGED+=("$(basename "$path")")
    fi
}

changed() { [[ " ${CHANGED[*]} " == *" $1 "* ]]; }

write_config() {
    local cpus mem_mb
    # Each node: half of the CPUs (at least 2: the tests run two 2-node jobs at once) and half of
    # the memory the kernel reports, less 10% (at least 512 MB) for the system and the daemons.
    cpus=$(( $(nproc) / 2 ))
    [ "$cpus" -ge 2 ] || cpus=2
    mem_mb=$(awk '/^MemTotal:/ { mb = int($2 / 1024); m = int(mb / 10); if (m < 512) m = 512; print int((mb - m) / 2) }' /proc/meminfo)

    install_file 644 "$ETC/slurm.conf" <<EOF
# Written by tests/cluster/slurm-localhost.sh: a test cluster on one machine.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$STATE/spool/slurmctld
# %n: the node's name, one folder and file per slurmd.
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# The nodes as described here, even where slurmd finds fewer CPUs (2 declared on a one-CPU machine).
SlurmdParameters=config_overrides
# No cgroups in a container: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd this names the munge socket (SLURM's slurm.conf manual).
AccountingStoragePass=$MUNGE_SOCKET
AccountingStorageEnforce=associations
# Keep the job comment (the Snakemake plugin writes the rule there) for sacct.
AccountingStoreFlags=job_comment
# Jobs stay visible to squeue/scontrol for 5 minutes after they end.
MinJobAge=300
KillWait=10
NodeName=${NODES[0]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[0]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[1]} CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=${PARTITIONS[0]} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=${PARTITIONS[1]} Nodes=ALL MaxTime=INFINITE State=UP
PartitionName=${PARTITIONS[2]} Nodes=ALL MaxTime=INFINITE State=UP
EOF

    # The database password is made once and kept; slurmdbd wants its file private.
    [ -s "$ETC/db-password" ] || install_file 600 "$ETC/db-password" < <(head -c 18 /dev/urandom | base64 | tr -d '/+=')
    install_file 600 "$ETC/slurmdbd.conf" <<EOF
# Written by tests/cluster/slurm-localhost.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db-password")
StorageLoc=slurm_acct_db
EOF
}

link_config() {
    if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$SLURM_CONF" ]; then
        return 0
    fi
    [ -e "$SYSTEM_CONF" ] || [ -L "$SYSTEM_CONF" ] \
        && die "$SYSTEM_CONF exists and is not this cluster's; move it away first (this script does not replace it)"
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -s "$SLURM_CONF" "$SYSTEM_CONF"
}

unlink_config() {
    if [ -L "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF")" = "$SLURM_CONF" ]; then
        rm -f "$SYSTEM_CONF"
    fi
}

# ---------------------------------------------------------------- daemons

start_munge() {
    running munged && return 0
    local key=$ETC/munge.key
    if [ ! -s "$key" ]; then
        dd if=/dev/urandom of="$key.tmp" bs=1024 count=1 status=none
        chmod 400 "$key.tmp"
        mv -f "$key.tmp" "$key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    munged --force --key-file="$key" --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$STATE/munge.seed"
    wait_for 20 munged munge --socket="$MUNGE_SOCKET" --no-input
    say "started munged"
}

db() { mariadb --no-defaults --socket="$DB_SOCKET" -u root "$@"; }

start_mariadb() {
    if ! running mariadbd; then
        if [ ! -d "$STATE/mysql/mysql" ]; then
            mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
                --auth-root-authentication-method=socket --skip-test-db > "$LOG/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed (log: $LOG/mariadb-install.log)"
        fi
        # The lock timeout SLURM's accounting guide recommends; a buffer pool sized for a test
        # (slurmdbd logs that it would like a larger one).
        setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
            --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
            < /dev/null > /dev/null 2>&1 &
        wait_for 60 mariadbd db -e "SELECT 1"
        say "started mariadbd"
    fi
    local pass
    pass=$(cat "$ETC/db-password")
    db <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    changed slurmdbd.conf && stop_daemon slurmdbd
    if ! running slurmdbd; then
        slurmdbd
        say "started slurmdbd"
    fi
    wait_for 60 slurmdbd sacctmgr -n list cluster
}

# sacctmgr entities: added when absent (sacctmgr refuses to add one twice).
ensure_associations() {
    [ -n "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster)" ] || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    [ -n "$(sacctmgr -n -P list account "$ACCOUNT" format=account)" ] \
        || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="conmh tests" Organization=conmh >/dev/null
    local user
    for user in root ${SUDO_USER:-}; do
        [ -n "$(sacctmgr -n -P list user "$user" format=user)" ] \
            || sacctmgr -i add user "$user" Account=root DefaultAccount=root Cluster="$CLUSTER" >/dev/null
        [ -n "$(sacctmgr -n -P list assoc user="$user" account="$ACCOUNT" cluster="$CLUSTER" format=user)" ] \
            || sacctmgr -i add user "$user" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    done
}

nodes_usable() {  # every node is idle, mixed or allocated (none down, drained or unknown)
    local states
    states=$(sinfo -h -N -p "${PARTITIONS[0]}" -o %T) || return 1
    [ "$(echo "$states" | grep -Ecx 'idle|mixed|allocated|completing')" -eq "${#NODES[@]}" ]
}

start_slurm() {
    local node i
    if changed slurm.conf; then  # daemons running with an older configuration restart
        for node in "${NODES[@]}"; do stop_daemon "slurmd-$node"; done
        stop_daemon slurmctld
    fi
    if ! running slurmctld; then
        slurmctld
        say "started slurmctld"
    fi
    wait_for 60 slurmctld scontrol ping
    for node in "${NODES[@]}"; do
        if ! running "slurmd-$node"; then
            slurmd -N "$node"
            say "started slurmd for node $node"
        fi
    done
    # A node left down or drained by an earlier run is put back into service.
    for ((i = 0; i < 60; i++)); do
        nodes_usable && break
        for node in $(sinfo -h -N -p "${PARTITIONS[0]}" -t down,drain -o %N); do
            scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
        done
        sleep 1
    done
    nodes_usable || die "the nodes did not become usable: $(sinfo -h -N -o '%N %T %E' | tr '\n' ';') (logs: $LOG/)"
}

# ---------------------------------------------------------------- commands

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and runs the daemons as root)"
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/mysql" "$STATE/spool/slurmctld"
    chmod 700 "$STATE"
    install_packages
    # torchrun's rendezvous on several nodes connects to the first node by its name.
    getent hosts "$HOST" >/dev/null || say "warning: this host's name $HOST does not resolve (add it to /etc/hosts)"
    write_config
    link_config
    start_munge
    start_mariadb
    start_slurmdbd
    ensure_associations
    start_slurm
    say "cluster '$CLUSTER' is up after ${SECONDS}s ($SYSTEM_CONF -> $SLURM_CONF)"
}

cmd_stop() {
    if running slurmctld; then
        # Jobs first, so that no job step outlives its slurmd.
        local jobs i
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            scancel --full $jobs >/dev/null 2>&1 || true
            for ((i = 0; i < 60; i++)); do
                [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    local name
    for name in "${NODES[@]/#/slurmd-}" slurmctld slurmdbd mariadbd munged; do
        stop_daemon "$name"
    done
    unlink_config
}

cmd_status() {
    local name pid status=0
    for name in munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        if pid=$(pid_of "$name"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            status=3
        fi
    done
    if [ "$status" -eq 0 ]; then
        sinfo -N -o '%N %P %T %c %m'
        nodes_usable || status=3
    fi
    return "$status"
}

case "${1:-}" in
    start) cmd_start ;;
    install) shift; install_packages "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status|install [PACKAGE...]" >&2; exit 2 ;;
esac
