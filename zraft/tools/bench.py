"""`zraft bench`: closed-loop load against a running cluster, in client processes.

C worker processes each hold one REQ socket to the leader and keep exactly one request
in flight (closed loop). Each phase runs ``warmup`` seconds unrecorded, then
``duration`` seconds recorded; an operation counts when it completes inside the
recorded window. The report gives throughput, latency percentiles and the CPU the
clients themselves used (in cores), so a reader can see who used the machine.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Any

PHASES = ("put", "get", "mixed")


@dataclass(frozen=True)
class BenchSpec:
    endpoints: tuple[str, ...]
    clients: int = 32
    duration: float = 10.0
    warmup: float = 1.0
    keys: int = 10_000
    key_size: int = 16
    value_size: int = 128
    request_timeout: float = 5.0
    # With keys: (client public key, client secret key, {endpoint: the node's public key}), all z85.
    curve: tuple[bytes, bytes, dict[str, bytes]] | None = None

    def secure(self, sock: Any, endpoint: str) -> None:
        """Make ``sock`` a CURVE client of the node at ``endpoint`` (no-op without keys)."""
        if self.curve is not None:
            public, secret, servers = self.curve
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, servers[endpoint]


@dataclass
class PhaseResult:
    phase: str
    clients: int
    ops: int
    errors: int
    ops_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    client_cpu_cores: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_key(i: int, size: int) -> bytes:
    return b"k" + str(i).zfill(size - 1).encode()


def percentile(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def find_leader(endpoints: tuple[str, ...], timeout: float = 10.0, keys: Any = None) -> str:
    from zraft.client import Client

    client = Client(endpoints, exactly_once=False, keys=keys)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ep, st in zip(endpoints, client.statuses(timeout=1.0), strict=True):
            if st and st.get("role") == "leader":
                return ep
        time.sleep(0.05)
    raise RuntimeError(f"no leader among {', '.join(endpoints)} within {timeout} s")


def _worker(wid: int, spec: BenchSpec, phase: str, leader: str, start_at: float, results: Any) -> None:
    """One closed-loop client; sends (latencies, errors, cpu seconds) back through ``results``."""
    import msgpack
    import zmq

    pack, unpack = msgpack.packb, msgpack.unpackb
    ctx = zmq.Context()
    rng = random.Random(wid)
    value = bytes(rng.getrandbits(8) for _ in range(spec.value_size))
    keys = [make_key(i, spec.key_size) for i in range(spec.keys)]
    addr = leader

    def connect() -> zmq.Socket:
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        spec.secure(s, addr)
        s.connect(addr)
        return s

    sock = connect()
    window_start = start_at + spec.warmup
    window_end = window_start + spec.duration
    lat = array("d")
    errors = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu0 = time.process_time()
    while True:
        now = time.monotonic()
        if now >= window_end:
            break
        write = phase == "put" or (phase == "mixed" and rng.random() < 0.5)
        key = keys[rng.randrange(len(keys))]
        req = {"op": "put", "key": key, "value": value} if write else {"op": "get", "key": key}
        t0 = time.monotonic()
        sock.send(pack(req))
        if not sock.poll(int(spec.request_timeout * 1000)):
            sock.close()
            sock = connect()
            errors += t0 >= window_start
            continue
        rep = unpack(sock.recv())
        t1 = time.monotonic()
        if rep.get("ok"):
            if window_start <= t1 < window_end:
                lat.append(t1 - t0)
        else:
            if t1 >= window_start:
                errors += 1
            if rep.get("error") == "not_leader" and rep.get("leader"):
                addr = rep["leader"]
                sock.close()
                sock = connect()
    cpu = time.process_time() - cpu0  # over warmup and window alike: reported per second of both
    sock.close()
    ctx.term()
    results.put((lat.tobytes(), errors, cpu))


def run_phase(spec: BenchSpec, phase: str, leader: str, progress: Any = None) -> PhaseResult:
    mpctx = mp.get_context("spawn")
    results = mpctx.Queue()
    start_at = time.monotonic() + 1.5 + 0.02 * spec.clients  # time for the workers to start
    procs = [mpctx.Process(target=_worker, args=(i, spec, phase, leader, start_at, results), daemon=True)
             for i in range(spec.clients)]
    for p in procs:
        p.start()
    total = spec.warmup + spec.duration
    while (left := start_at + total - time.monotonic()) > 0:
        if progress is not None:
            progress(min(total, max(0.0, total - left)), total)
        time.sleep(min(0.2, left))
    if progress is not None:
        progress(total, total)
    lat_all = array("d")
    errors = 0
    cpu = 0.0
    for _ in procs:
        raw, errs, c = results.get(timeout=spec.request_timeout + 30)
        chunk = array("d")
        chunk.frombytes(raw)
        lat_all.extend(chunk)
        errors += errs
        cpu += c
    for p in procs:
        p.join(10)
    lats = sorted(lat_all)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return PhaseResult(phase=phase, clients=spec.clients, ops=len(lats), errors=errors,
                       ops_per_s=round(len(lats) / spec.duration, 1), p50_ms=ms(percentile(lats, 50)),
                       p90_ms=ms(percentile(lats, 90)), p99_ms=ms(percentile(lats, 99)),
                       max_ms=ms(lats[-1] if lats else None),
                       client_cpu_cores=round(cpu / (spec.warmup + spec.duration), 2))


def preload(spec: BenchSpec, leader: str) -> None:
    """Write every key once (so gets hit), many requests in flight from one socket per window slot."""
    import msgpack
    import zmq

    ctx = zmq.Context.instance()
    value = b"x" * spec.value_size
    window = 64
    socks = [ctx.socket(zmq.DEALER) for _ in range(window)]
    poller = zmq.Poller()
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        spec.secure(s, leader)
        s.connect(leader)
        poller.register(s, zmq.POLLIN)
    todo = list(range(spec.keys))
    inflight = 0
    try:
        for s in socks:
            if todo:
                s.send_multipart([b"", msgpack.packb({"op": "put", "key": make_key(todo.pop(), spec.key_size),
                                                      "value": value})])
                inflight += 1
        while inflight:
            events = poller.poll(int(spec.request_timeout * 1000))
            if not events:
                raise RuntimeError("preload: the cluster stopped answering")
            for s, _ in events:
                s.recv_multipart()
                inflight -= 1
                if todo:
                    s.send_multipart([b"", msgpack.packb({"op": "put", "key": make_key(todo.pop(), spec.key_size),
                                                          "value": value})])
                    inflight += 1
    finally:
        for s in socks:
            s.close()
