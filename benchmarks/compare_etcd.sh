#!/usr/bin/env bash
# compare_etcd.sh - zraft next to etcd on this host, same load generator, same run.
#
# Usage: benchmarks/compare_etcd.sh [ZRAFT_CHECKOUT]    (default: the repo this script is in)
#
# 1. starts a 3-node zraft cluster from ZRAFT_CHECKOUT (`bin/zraft cluster up`) in a temp dir,
#    runs shared/bench/loadgen.py against it, stops it;
# 2. starts a 3-member etcd with shared/bench/etcd_cluster.sh, runs the same loadgen.py, stops it;
# 3. prints a markdown table: ops/s, p50/p99 per phase and system, the zraft/etcd throughput
#    ratio, server CPU, client CPU per op and the CPU other processes used in the window.
#
# Phases (16 B keys, 128 B values, fsync on for both): put with 32 clients (after a preload of
# the key space), linearizable get with 32 clients, put with 1 client.
# Environment: DURATION (10) and WARMUP (1) seconds per phase, REPEAT (1) full rounds,
#   CLIENTS_MANY (32), KEYSPACE (10000), ZRAFT_PORT_BASE (5900: peers 5900-5902, clients +100,
#   http +200), BENCH_DIR (default REPO/../shared/bench), KEEP_TMP=1 keeps the temp dir,
#   ONLY=zraft|etcd runs one system, OUT=FILE also appends loadgen's JSON lines to FILE,
#   ETCD_SYSTEMS ("etcd etcd-grpc"): loadgen adapters run against the etcd cluster, one after
#   the other on the same cluster (etcd = v3 JSON gateway over HTTP/1.1, stdlib client;
#   etcd-grpc = native gRPC, needs grpcio in the checkout's venv, skipped with a note if absent).
# Every process this script starts is stopped on exit, error or Ctrl-C (trap). Each loadgen
# call is bounded by `timeout`; one round takes about 2.5 minutes at the defaults (three systems
# x three phases of DURATION + WARMUP, preloads, start/stop), plus the checkout's first-run
# venv setup.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CHECKOUT=$(cd "${1:-$REPO}" && pwd)
BENCH_DIR=${BENCH_DIR:-$REPO/../shared/bench}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-1}
REPEAT=${REPEAT:-1}
CLIENTS_MANY=${CLIENTS_MANY:-32}
KEYSPACE=${KEYSPACE:-10000}
ZRAFT_PORT_BASE=${ZRAFT_PORT_BASE:-5900}
ONLY=${ONLY:-}
OUT=${OUT:-}
ETCD_SYSTEMS=${ETCD_SYSTEMS:-etcd etcd-grpc}

[[ -f $BENCH_DIR/loadgen.py && -x $BENCH_DIR/etcd_cluster.sh ]] || {
    echo "no loadgen.py / etcd_cluster.sh in $BENCH_DIR (set BENCH_DIR)" >&2; exit 2; }
[[ -x $CHECKOUT/bin/zraft ]] || { echo "$CHECKOUT has no bin/zraft" >&2; exit 2; }
if [[ $ONLY != zraft ]] && ! command -v "${ETCD_BIN:-/usr/bin/etcd}" >/dev/null; then
    echo "etcd not found: apt-get install -y etcd-server etcd-client" >&2; exit 2
fi

TMP=$(mktemp -d /tmp/compare_etcd.XXXXXX)
RESULTS=$TMP/results.jsonl
SUP_PID=
LG_PID=
NODE_PIDS=()
ETCD_DIR=

stop_zraft() {
    [[ -n $SUP_PID ]] || return 0
    if kill -0 "$SUP_PID" 2>/dev/null; then
        kill -TERM "$SUP_PID" 2>/dev/null || true
        for _ in $(seq 1 75); do kill -0 "$SUP_PID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$SUP_PID" 2>/dev/null || true
    fi
    wait "$SUP_PID" 2>/dev/null || true
    local p
    for p in "${NODE_PIDS[@]}"; do    # the nodes die with the supervisor; make sure of it
        for _ in $(seq 1 25); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$p" 2>/dev/null || true
    done
    SUP_PID=; NODE_PIDS=()
}

stop_etcd() {
    [[ -n $ETCD_DIR ]] || return 0
    "$BENCH_DIR/etcd_cluster.sh" stop "$ETCD_DIR" >&2 || true
    ETCD_DIR=
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $LG_PID ]]; then
        kill -TERM "$LG_PID" 2>/dev/null || true
        wait "$LG_PID" 2>/dev/null || true
    fi
    stop_zraft
    stop_etcd
    if [[ ${KEEP_TMP:-0} == 1 || $rc != 0 ]]; then echo "temp dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

load() { echo "[load] $1: $(cut -d' ' -f1-3 /proc/loadavg)" >&2; }

# The generator runs with the checkout's venv python (the zraft adapter needs pyzmq + msgpack;
# the etcd adapter is stdlib only), so both systems get the same interpreter.
"$CHECKOUT/bin/zraft" --help >/dev/null    # first run creates CHECKOUT/.venv
PY=$CHECKOUT/.venv/bin/python
export PYTHONPATH=
if [[ ! -f $BENCH_DIR/cpuacct.py ]]; then
    # loadgen.py imports cpuacct "beside this file"; if shared/bench lacks it, use a /proc-based
    # stand-in (same function names and result keys). A real one next to loadgen.py wins.
    mkdir -p "$TMP/shim"
    cat > "$TMP/shim/cpuacct.py" <<'EOF'
"""Stand-in for shared/bench/cpuacct.py: CPU split over a window, from /proc."""
import os

_HZ = os.sysconf("SC_CLK_TCK")
_PF_KTHREAD = 0x00200000


def _procs():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rp = s.rfind(")")
        f = s[rp + 2:].split()   # state ppid ... flags(6) ... utime(11) stime(12)
        out[int(d)] = (int(f[1]), int(f[6]), int(f[11]) + int(f[12]), s[s.find("(") + 1:rp])
    return out


def snapshot():
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return {"procs": _procs(), "cpu": cpu}


def _tree(procs, roots):
    kids = {}
    for pid, v in procs.items():
        kids.setdefault(v[0], []).append(pid)
    seen, stack = set(), [p for p in roots if p in procs]
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack.extend(kids.get(p, []))
    return seen


def split(s0, s1, window_s, gen_pids=(), server_pids=()):
    p0, p1 = s0["procs"], s1["procs"]
    delta = {pid: v[2] - (p0[pid][2] if pid in p0 else 0) for pid, v in p1.items()}
    gen = _tree(p1, gen_pids)
    srv = _tree(p1, server_pids) - gen
    mine = gen | srv | {os.getpid()}
    cores = lambda t: round(t / _HZ / window_s, 3)
    kt = sum(d for p, d in delta.items() if p1[p][1] & _PF_KTHREAD and p not in mine)
    others = {p: d for p, d in delta.items() if not p1[p][1] & _PF_KTHREAD and p not in mine and d > 0}
    d = [b - a for a, b in zip(s0["cpu"], s1["cpu"])]
    total, ncpu = sum(d[:8]) or 1, os.cpu_count() or 1
    top = sorted(others.items(), key=lambda kv: -kv[1])[:3]
    return {
        "gen_cpu_cores_proc": cores(sum(delta[p] for p in gen)),
        "server_cpu_cores": cores(sum(delta[p] for p in srv)) if server_pids else None,
        "kernel_thread_cores": cores(kt),
        "irq_cores": round((d[5] + d[6]) / total * ncpu, 3),
        "other_user_cores": cores(sum(others.values())),
        "host_busy_cores": round((total - d[3] - d[4]) / total * ncpu, 3),
        "host_cores": ncpu,
        "top_other": [f"{p1[p][3]}({p}) {cores(t)}" for p, t in top],
    }
EOF
    export PYTHONPATH=$TMP/shim
    echo "note: $BENCH_DIR/cpuacct.py is missing; using the /proc-based stand-in" >&2
fi

if [[ " $ETCD_SYSTEMS " == *" etcd-grpc "* ]] && ! "$PY" -c "import grpc" 2>/dev/null; then
    echo "note: grpcio is not in $PY's venv: skipping etcd-grpc ($PY -m pip install grpcio)" >&2
    ETCD_SYSTEMS=$(echo " $ETCD_SYSTEMS " | sed 's/ etcd-grpc / /')
fi

LG_TIMEOUT=$(python3 -c "print(int(3 * (float('$DURATION') + float('$WARMUP')) + 240))")
loadgen() {   # loadgen SYSTEM LABEL ENDPOINTS EXTRA_ARGS...
    local system=$1 label=$2 eps=$3; shift 3
    # In the background + wait, so a signal reaches the trap at once; `timeout` puts loadgen and
    # its worker processes in their own process group and passes a TERM on to all of them.
    timeout -k 5 "$LG_TIMEOUT" "$PY" "$BENCH_DIR/loadgen.py" --system "$system" --endpoints "$eps" \
        --duration "$DURATION" --warmup "$WARMUP" --keyspace "$KEYSPACE" --key-size 16 --value-size 128 \
        --label "$label" --out "$RESULTS" "$@" >/dev/null &
    LG_PID=$!
    wait "$LG_PID"
    LG_PID=
}

run_phases() {   # run_phases SYSTEM ROUND ENDPOINTS SERVER_PID_ARGS...
    local system=$1 round=$2 eps=$3; shift 3
    load "$system round $round before"
    loadgen "$system" "round$round" "$eps" --workers "$CLIENTS_MANY" --phases preload,put,get "$@"
    loadgen "$system" "round$round" "$eps" --workers 1 --phases put "$@"
    load "$system round $round after"
}

start_zraft() {
    local zdir=$TMP/zraft$1 i
    mkdir -p "$zdir"
    for i in 0 1 2; do
        echo "Ip=\"127.0.0.1\",port=\"$((ZRAFT_PORT_BASE + i))\"" >> "$zdir/Config.txt"
    done
    # Same session as the generator (no setsid): see loadgen.py's scheduling note.
    "$CHECKOUT/bin/zraft" cluster up --config "$zdir/Config.txt" --data-dir "$zdir/data" \
        --log-level WARNING </dev/null >"$zdir/supervisor.log" 2>&1 &
    SUP_PID=$!
    ZRAFT_EPS=127.0.0.1:$((ZRAFT_PORT_BASE + 100)),127.0.0.1:$((ZRAFT_PORT_BASE + 101)),127.0.0.1:$((ZRAFT_PORT_BASE + 102))
    # wait (up to 30 s) until one node answers status as leader and the others know it
    "$PY" - "$ZRAFT_EPS" <<'EOF' || { echo "zraft cluster did not elect a leader; see $zdir" >&2; exit 1; }
import sys, time, msgpack, zmq
eps = ["tcp://" + e for e in sys.argv[1].split(",")]
ctx = zmq.Context()
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    roles = []
    for ep in eps:
        s = ctx.socket(zmq.REQ); s.setsockopt(zmq.LINGER, 0); s.connect(ep)
        s.send(msgpack.packb({"op": "status"}))
        roles.append(msgpack.unpackb(s.recv()) if s.poll(300) else {})
        s.close()
    if [r.get("role") for r in roles].count("leader") == 1 and all(r.get("leader") for r in roles):
        sys.exit(0)
    time.sleep(0.3)
sys.exit(1)
EOF
    mapfile -t NODE_PIDS < <(pgrep -P "$SUP_PID")
    [[ ${#NODE_PIDS[@]} == 3 ]] || { echo "expected 3 zraft node processes, found ${#NODE_PIDS[@]}" >&2; exit 1; }
    echo "zraft up: supervisor $SUP_PID, nodes ${NODE_PIDS[*]}, clients $ZRAFT_EPS" >&2
}

for round in $(seq 1 "$REPEAT"); do
    if [[ $ONLY != etcd ]]; then
        start_zraft "$round"
        run_phases zraft "$round" "$ZRAFT_EPS" --server-pids "$(IFS=,; echo "${NODE_PIDS[*]}")"
        stop_zraft
    fi
    if [[ $ONLY != zraft ]]; then
        ETCD_DIR=$TMP/etcd$round
        "$BENCH_DIR/etcd_cluster.sh" start "$ETCD_DIR" >&2
        for sys in $ETCD_SYSTEMS; do
            run_phases "$sys" "$round" "$("$BENCH_DIR/etcd_cluster.sh" endpoints)" \
                --server-pidfiles "$ETCD_DIR/m*.pid"
        done
        stop_etcd
    fi
done

echo "checkout: $CHECKOUT ($(git -C "$CHECKOUT" rev-parse --short HEAD 2>/dev/null || echo '?'))," \
     "host: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(date -Is)"
echo
"$PY" - "$RESULTS" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["label"], r["phase"], r["workers"], r["system"])] = r
order = {"zraft": 0, "etcd": 1, "etcd-grpc": 2}
keys = sorted(rows, key=lambda k: (int(k[0].removeprefix("round")), k[1] != "put", -k[2], order.get(k[3], 9)))
print("| round | phase | clients | system | ops/s | p50 ms | p99 ms | zraft / this | server cores "
      "| client CPU us/op | other-user cores | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
f = lambda v, fmt="{:.0f}": "-" if v is None else fmt.format(v)
for k in keys:
    r = rows[k]
    z = rows.get(k[:3] + ("zraft",))
    ratio = z["ops_per_s"] / r["ops_per_s"] if z and r["ops_per_s"] else None
    phase = "get (linearizable)" if k[1] == "get" and r.get("read_mode", "linearizable") == "linearizable" else k[1]
    print(f"| {k[0].removeprefix('round')} | {phase} | {k[2]} | {k[3]} | {f(r['ops_per_s'])} "
          f"| {f(r['lat_ms']['p50'], '{:.2f}')} | {f(r['lat_ms']['p99'], '{:.2f}')} | {f(ratio, '{:.2f}')} "
          f"| {f(r['server_cpu_cores'], '{:.2f}')} | {f(r['gen_cpu_us_per_op'])} "
          f"| {f(r['other_user_cores'], '{:.2f}')} | {r['errors']} |")
EOF
if [[ -n $OUT ]]; then cat "$RESULTS" >> "$OUT"; echo "JSON lines appended to $OUT" >&2; fi
