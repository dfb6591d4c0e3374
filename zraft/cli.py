"""The `zraft` command line: cluster, node and client commands (typer)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from zraft.client.protocol import commit_span, log_span
from zraft.cluster.config import MAX_NODE_ID, ClusterConfig, ConfigError, Settings, load_config

app = typer.Typer(help="zraft: a strongly consistent, replicated key-value store on Raft.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
fault_app = typer.Typer(help="Inject network faults into running nodes started with --allow-faults.",
                        no_args_is_help=True)
cluster_app = typer.Typer(help="Run a whole cluster on this host, and look at it.", no_args_is_help=True)
client_app = typer.Typer(help="One request against the cluster; the leader is found automatically.",
                         no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(client_app, name="client")
snapshot_app = typer.Typer(help="Snapshots: back up a running cluster, restore a backup, compact logs.",
                           no_args_is_help=True)
app.add_typer(fault_app, name="fault")
app.add_typer(snapshot_app, name="snapshot")

err = Console(stderr=True)

ConfigOpt = typer.Option(Path("Config.txt"), "--config", "-c", envvar="ZRAFT_CONFIG",
                         help="The cluster's Config.txt: one node per line.")
DataDirOpt = typer.Option(Path("data"), "--data-dir", "-d", envvar="ZRAFT_DATA_DIR",
                          help="Where nodes keep their state, one sub-folder per node id.")
LogLevelOpt = typer.Option("INFO", "--log-level", envvar="ZRAFT_LOG_LEVEL",
                           help="Terminal log level (DEBUG, INFO, WARNING, ERROR); the node's log file in its "
                                "data dir gets INFO and up.")
EndpointsOpt = typer.Option(None, "--endpoint", "-e",
                            help="A node's client endpoint (tcp://IP:PORT); repeat for several. "
                                 "Default: every node in --config.")
AllowFaultsOpt = typer.Option(False, "--allow-faults", envvar="ZRAFT_ALLOW_FAULTS",
                              help="Accept fault injection requests (`zraft fault ...`). Off by default: "
                                   "never on a production node.")
MAX_TIMEOUT_S = 86_400.0  # a day; far more than any request needs, and within what ZeroMQ's poll takes


def _check_timeout(value: float) -> float:
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        raise _fail(f"--timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, got {value:g}")
    return value


def _check_node_id(value: int) -> int:
    if not 1 <= value <= MAX_NODE_ID:
        raise _fail(f"a node id is an integer from 1 to 2**63-1, got {value}")
    return value


TimeoutOpt = typer.Option(5.0, "--timeout", "-t", callback=_check_timeout, help="Give up after this many seconds.")
KeysOpt = typer.Option(None, "--keys", envvar="ZRAFT_KEYS",
                       help="A keys directory (`zraft keys init`): authenticate and encrypt everything with its "
                            "CURVE keys. Default: none (the ports are open to anyone who can reach them).")


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``error: MESSAGE`` on stderr (never wrapped), and the exit to raise."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # a path, LevelDB text: [..]
    return typer.Exit(code)


def _arg_bytes(text: str) -> bytes:
    """A key or value from the command line as the bytes given: an argument that is not valid in
    the locale's encoding reaches Python with surrogate escapes, and goes back to its raw bytes."""
    return os.fsencode(text)


def _show(data: bytes) -> str:
    """Bytes for a message: UTF-8, with any other byte as a \\xNN escape."""
    return data.decode("utf-8", "backslashreplace")


def _load(config: Path) -> ClusterConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise _fail(str(exc)) from None


def _ring(config: Path, keys: Path | None, node_id: int | None = None):
    """The KeyRing of a node (``node_id``) or of a client, from ``--keys``; None without keys."""
    if keys is None:
        return None
    from zraft.cluster.keys import KeyRing, KeysError

    try:
        return KeyRing.load(keys, _load(config), node_id)
    except KeysError as exc:
        raise _fail(str(exc)) from None


def _client(config: Path, endpoints: list[str] | None, keys: Path | None, timeout: float = 5.0,
            only: list[str] | None = None):
    """A client of the cluster (or of the ``only`` endpoints), with the keys of ``--keys``."""
    from zraft.client import Client

    return Client(only or _endpoints(config, endpoints), timeout=timeout, keys=_ring(config, keys))


_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):([0-9]{1,5})", re.ASCII)


def _endpoints(config: Path, endpoints: list[str] | None) -> list[str]:
    if endpoints:
        out = []
        for e in endpoints:
            ep = e if e.startswith("tcp://") else f"tcp://{e}"
            m = _ENDPOINT.fullmatch(ep)
            if m is None or not 1 <= int(m.group(2)) <= 65535:
                raise _fail(f"--endpoint {e!r}: expected tcp://HOST:PORT or HOST:PORT, with a port in 1..65535")
            out.append(ep)
        return out
    return [n.client_endpoint for n in _load(config).nodes]


# ---------------------------------------------------------------------- node


@app.command()
def node(
    id: int = typer.Option(..., "--id", "-i", callback=_check_node_id, help="This node's id in Config.txt."),
    config: Path = ConfigOpt,
    data_dir: Path = DataDirOpt,
    log_level: str = LogLevelOpt,
    allow_faults: bool = AllowFaultsOpt,
    keys: Path | None = KeysOpt,
    join: bool = typer.Option(False, "--join", help="Join a running cluster as a new member: Config.txt holds this "
                                                    "node's line and at least one member's; it takes part once "
                                                    "the leader adds it (`zraft member add`)."),
) -> None:
    """Run one node in the foreground (what `cluster up` spawns; also how a node runs on its own host)."""
    import zmq

    from zraft.node.leveldb import StorageError
    from zraft.node.server import NodeFailed, NodeRefused, run_node

    cluster = _load(config)
    try:
        cluster.node(id)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    settings = _settings()
    ring = _ring(config, keys, id)
    try:
        run_node(cluster, id, data_dir, settings, log_level, allow_faults, ring, join=join)
    except NodeRefused as exc:  # it may not take part under this id: the message says why and what to do
        raise _fail(f"node {id} refused: {exc}", 4) from None
    except NodeFailed as exc:  # it ran, then its storage failed: the message says why and what to do
        raise _fail(f"node {id} stopped: {exc}") from None
    except (OSError, zmq.ZMQError, StorageError) as exc:  # a port in use, a data dir in use or unreadable
        raise _fail(f"node {id} could not start: {exc}") from None


# ---------------------------------------------------------------------- cluster


@cluster_app.command("up")
def cluster_up(config: Path = ConfigOpt, data_dir: Path = DataDirOpt, log_level: str = LogLevelOpt,
               allow_faults: bool = AllowFaultsOpt, keys: Path | None = KeysOpt) -> None:
    """Start one process per node in Config.txt and show their state until Ctrl-C (which stops them all)."""
    from zraft.cluster.supervisor import Supervisor, SupervisorError

    cluster = _load(config)
    _settings()  # fail before spawning anything
    try:
        Supervisor(config, cluster, data_dir, log_level, allow_faults=allow_faults, keys=keys,
                   ring=_ring(config, keys)).run()
    except SupervisorError as exc:
        raise _fail(str(exc)) from None


@cluster_app.command("status")
def cluster_status(
    config: Path = ConfigOpt,
    endpoints: list[str] | None = EndpointsOpt,
    as_json: bool = typer.Option(False, "--json", help="One JSON list, for scripts."),
    timeout: float = typer.Option(1.0, "--timeout", "-t", callback=_check_timeout,
                                  help="How long to wait for each node."),
    keys: Path | None = KeysOpt,
) -> None:
    """Every node's id, role, term, leader, commit and applied index, and whether it answers.

    Exit code 0 when at least one node answers, 2 when none does (the rows are printed all the same)."""
    eps = _endpoints(config, endpoints)
    with _client(config, endpoints, keys) as c:
        statuses = c.statuses(timeout)
    rows = [{"endpoint": ep, "answers": st is not None, **(st or {})} for ep, st in zip(eps, statuses, strict=False)]
    for r in rows:
        r.pop("ok", None)
    if as_json:
        print(json.dumps(rows), flush=True)
    else:
        _status_table(rows)
    if not any(r["answers"] for r in rows):
        raise _fail(f"no node answered within {timeout:g} s at {', '.join(eps)} (is the cluster up?)", 2)


def _status_table(rows: list[dict]) -> None:
    t = Table(box=box.SIMPLE_HEAD, caption="commit (applied, when behind); log: the indexes it holds",
              caption_justify="left")
    for col in ("id", "endpoint", "answers", "role", "term", "leader", "commit", "log"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r.get("id", "-")), r["endpoint"].removeprefix("tcp://"), "yes" if r["answers"] else "[red]no[/]",
                  str(r.get("role", "-")), str(r.get("term", "-")), str(r.get("leader", "-")),
                  commit_span(r), log_span(r))
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    out.print(t)


def _control(op: str, node_id: int, data_dir: Path) -> None:
    from zraft.cluster.supervisor import send_control

    rep = send_control(data_dir, op, node_id)
    if not rep.get("ok"):
        raise _fail(rep.get("message", "failed"))
    print(rep["message"])


NodeIdArg = typer.Argument(..., help="Node id.", callback=_check_node_id)
NodeIdArgNew = typer.Argument(..., help="Node id.", callback=_check_node_id, metavar="ID")


@cluster_app.command("start-node")
def start_node(node_id: int = NodeIdArg, data_dir: Path = DataDirOpt) -> None:
    """Ask the running `cluster up` supervisor to start node N again (it never restarts one by itself)."""
    _control("start", node_id, data_dir)


@cluster_app.command("stop-node")
def stop_node(node_id: int = NodeIdArg, data_dir: Path = DataDirOpt) -> None:
    """Ask the running supervisor to stop node N cleanly (SIGTERM)."""
    _control("stop", node_id, data_dir)


@cluster_app.command("reload")
def cluster_reload(data_dir: Path = DataDirOpt) -> None:
    """Through the running `cluster up`: make the membership match Config.txt as edited now (adds new lines, removes
    dropped ones, one change at a time) and start or stop the local processes."""
    from zraft.cluster.supervisor import RELOAD_STEP_TIMEOUT_S, send_control

    rep = send_control(data_dir, "reload", 0, timeout=4 * RELOAD_STEP_TIMEOUT_S)
    if not rep.get("ok"):
        raise _fail(rep.get("message", "failed"))
    print(rep["message"])


@cluster_app.command("kill-node")
def kill_node(node_id: int = NodeIdArg, data_dir: Path = DataDirOpt) -> None:
    """Ask the running supervisor to kill node N with SIGKILL, as a crash would."""
    _control("kill", node_id, data_dir)


# ---------------------------------------------------------------------- client


def _run_client(config: Path, endpoints: list[str] | None, timeout: float, fn, keys: Path | None = None):
    from zraft.client import OutcomeUnknown, ZraftError

    try:
        with _client(config, endpoints, keys, timeout) as c:
            return fn(c)
    except OutcomeUnknown as exc:
        raise _fail(f"{exc.message} (outcome unknown; check with `zraft client get` or `zraft member list`)",
                    3) from None
    except ZraftError as exc:
        raise _fail(f"{exc.code}: {exc.message}", 2) from None


def _out(value: bytes) -> None:
    sys.stdout.buffer.write(value + b"\n")
    sys.stdout.flush()


@client_app.command("put")
def client_put(key: str, value: str, config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
               timeout: float = TimeoutOpt, keys: Path | None = KeysOpt,
               lease: int | None = typer.Option(None, "--lease", min=1, max=(1 << 63) - 1,
                                                help="Attach KEY to this lease: it goes when the lease does.")) -> None:
    """Set KEY to VALUE. Prints OK once the write is committed on a majority and applied."""
    _run_client(config, endpoints, timeout, lambda c: c.put(_arg_bytes(key), _arg_bytes(value), lease=lease), keys)
    print("OK")


@client_app.command("get")
def client_get(key: str, config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
               timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Print KEY's value (a linearizable read). Exit code 1 if there is no such key."""
    value = _run_client(config, endpoints, timeout, lambda c: c.get(_arg_bytes(key)), keys)
    if value is None:
        raise _fail(f"no such key: {_show(_arg_bytes(key))}")
    _out(value)


@client_app.command("delete")
def client_delete(key: str, config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                  timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Delete KEY. Prints 1 if it existed, 0 if not (etcdctl's convention)."""
    deleted = _run_client(config, endpoints, timeout, lambda c: c.delete(_arg_bytes(key)), keys)
    print(1 if deleted else 0)


@client_app.command("cas")
def client_cas(key: str, expect: str = typer.Argument(..., help="The value KEY must hold now; see --absent."),
               value: str = typer.Argument(...),
               absent: bool = typer.Option(False, "--absent", help="Expect KEY to be absent (EXPECT is ignored)."),
               config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
               timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Compare-and-swap: set KEY to VALUE only if it holds EXPECT. Exit code 1 if it did not swap."""
    swapped, current = _run_client(config, endpoints, timeout,
                                   lambda c: c.cas(_arg_bytes(key), None if absent else _arg_bytes(expect),
                                                   _arg_bytes(value)), keys)
    if not swapped:
        shown = "absent" if current is None else _show(current)
        raise _fail(f"not swapped: {_show(_arg_bytes(key))} is {shown}")
    print("OK")


@client_app.command("range")
def client_range(prefix: str = typer.Argument(..., help="Every key that starts with PREFIX (\"\" for all)."),
                 limit: int = typer.Option(0, "--limit", min=0, help="At most this many keys (0: all)."),
                 keys_only: bool = typer.Option(False, "--keys-only", help="Print the keys only."),
                 as_json: bool = typer.Option(False, "--json", help="One JSON object: kvs, more, revision."),
                 config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                 timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Print the keys under PREFIX in key order: each key, then its value (like etcdctl get --prefix).

    Each page is a linearizable read (a node cuts a reply at about 2 MiB; the next page follows)."""
    def read(c):
        kvs, more, revision = [], False, 0
        for r in c.range_pages(_arg_bytes(prefix), page=min(limit or 1000, 1000), keys_only=keys_only):
            kvs += r.kvs
            revision = revision or r.revision
            more = r.more
            if limit and len(kvs) >= limit:
                more = more or len(kvs) > limit
                return kvs[:limit], more, revision
        return kvs, more, revision

    kvs, more, revision = _run_client(config, endpoints, timeout, read, keys)
    if as_json:
        print(json.dumps({"kvs": [{"key": _show(k), "value": None if v is None else _show(v), "mod_revision": rev}
                                  for k, v, rev in kvs], "more": more, "revision": revision}))
        return
    for k, v, _ in kvs:
        _out(k)
        if not keys_only:
            _out(v)


@client_app.command("watch")
def client_watch(name: str = typer.Argument(..., metavar="PREFIX", help="Watch every key that starts with PREFIX."),
                 key: bool = typer.Option(False, "--key", help="Watch the one key PREFIX instead."),
                 rev: int = typer.Option(0, "--rev", min=0, help="Start at this revision (0: the next write)."),
                 config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                 keys: Path | None = KeysOpt) -> None:
    """Print each change under PREFIX as it is committed, until Ctrl-C.

    One line each: `REVISION PUT KEY VALUE` or `REVISION DELETE KEY`. It resumes by itself across leader
    changes; exit code 2 if the history no longer holds --rev."""
    from zraft.client import ZraftError

    try:
        with _client(config, endpoints, keys) as c:
            what = {"key": _arg_bytes(name)} if key else {"prefix": _arg_bytes(name)}
            with c.watch(**what, start_revision=rev or None) as w:
                for ev in w:
                    line = f"{ev['revision']} {ev['type'].upper()} {_show(ev['key'])}"
                    print(line if ev["value"] is None else f"{line} {_show(ev['value'])}", flush=True)
    except KeyboardInterrupt:
        return
    except ZraftError as exc:
        raise _fail(f"{exc.code}: {exc.message}", 2) from None


@client_app.command("lock", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def client_lock(ctx: typer.Context, name: str = typer.Argument(..., help="The lock's name."),
                ttl: int = typer.Option(10, "--ttl", min=1, help="Seconds the lock outlives its holder if it dies."),
                config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                keys: Path | None = KeysOpt) -> None:
    """Run a command while holding the lock NAME (like etcdctl lock NAME -- CMD).

    `zraft client lock jobs -- ./nightly.sh` waits its turn (fair: first come, first served) and exits with the
    command's exit code. Without a command, it prints the lock's key once held and holds it until Ctrl-C."""
    import subprocess

    from zraft.client import ZraftError

    cmd = list(ctx.args)
    try:
        with _client(config, endpoints, keys) as c, c.lock(_arg_bytes(name), ttl=ttl) as lock:
            if not cmd:
                print(_show(lock.key), flush=True)
                import time

                while lock.held:
                    time.sleep(0.2)
                raise _fail("the lock's lease expired: it is not held any more", 2)
            rc = subprocess.call(cmd)
    except KeyboardInterrupt:
        return
    except ZraftError as exc:
        raise _fail(f"{exc.code}: {exc.message}", 2) from None
    raise typer.Exit(rc)


@client_app.command("elect")
def client_elect(name: str = typer.Argument(..., help="The election's name."),
                 proposal: str | None = typer.Argument(None, help="Stand with this value; without it, watch."),
                 ttl: int = typer.Option(10, "--ttl", min=1, help="Seconds leadership outlives a dead leader."),
                 config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                 keys: Path | None = KeysOpt) -> None:
    """Leader election NAME (like etcdctl elect): stand with PROPOSAL, or watch the leader.

    With PROPOSAL: stand, print it once elected and lead until Ctrl-C. Without: print the leader's value each
    time it changes."""
    import time

    from zraft.client import ZraftError

    try:
        with _client(config, endpoints, keys) as c:
            election = c.election(_arg_bytes(name), ttl=ttl)
            if proposal is None:
                for value in election.observe():
                    print("(none)" if value is None else _show(value), flush=True)
            election.campaign(_arg_bytes(proposal))
            print(proposal, flush=True)
            try:
                while election.leading:
                    time.sleep(0.2)
            finally:
                election.resign()
            raise _fail("the lease expired: no longer leading", 2)
    except KeyboardInterrupt:
        return
    except ZraftError as exc:
        raise _fail(f"{exc.code}: {exc.message}", 2) from None


lease_app = typer.Typer(help="Leases: keys that go when their lease expires or is revoked.", no_args_is_help=True)
client_app.add_typer(lease_app, name="lease")
LeaseArg = typer.Argument(..., min=1, max=(1 << 63) - 1, help="The lease id (from `lease grant`).")


@lease_app.command("grant")
def lease_grant(ttl: int = typer.Argument(..., min=1, max=1 << 31, help="Seconds it lives without a keepalive."),
                config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Grant a lease of TTL seconds; prints its id (give it to `client put --lease`)."""
    print(_run_client(config, endpoints, timeout, lambda c: c.lease_grant(ttl), keys))


@lease_app.command("keepalive")
def lease_keepalive(lease: int = LeaseArg, once: bool = typer.Option(False, "--once", help="One keepalive, then exit."),
                    config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                    timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Keep the lease alive until Ctrl-C (or once, with --once).

    A keepalive every third of its TTL; exit code 2 once the lease is gone (expired or revoked)."""
    import time

    try:
        while True:
            ttl = _run_client(config, endpoints, timeout, lambda c: c.lease_keepalive(lease), keys)
            print(f"lease {lease} kept alive, ttl {ttl}", flush=True)
            if once:
                return
            time.sleep(max(0.2, ttl / 3))
    except KeyboardInterrupt:
        return


@lease_app.command("revoke")
def lease_revoke(lease: int = LeaseArg, config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                 timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Revoke the lease now: every key attached to it is deleted, at one revision."""
    _run_client(config, endpoints, timeout, lambda c: c.lease_revoke(lease), keys)
    print("OK")


@client_app.command("status")
def client_status(config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                  keys: Path | None = KeysOpt) -> None:
    """Same as `zraft cluster status --json`."""
    cluster_status(config, endpoints, as_json=True, timeout=1.0, keys=keys)


# ---------------------------------------------------------------------- member

member_app = typer.Typer(help="The cluster's membership: list, add, remove and promote members, move the leader.",
                         no_args_is_help=True)
app.add_typer(member_app, name="member")
MemberTimeoutOpt = typer.Option(60.0, "--timeout", "-t", callback=_check_timeout,
                                help="Give up after this many seconds (a new member may need a while to catch up).")


def _member_rows(members: list[dict], leader: int | None) -> list[dict]:
    return [{**m, "role": "voter" if m.get("voter") else "learner", "leader": m.get("id") == leader} for m in members]


def _print_members(members: list[dict], leader: int | None, as_json: bool) -> None:
    rows = _member_rows(members, leader)
    if as_json:
        print(json.dumps({"leader": leader, "members": rows}), flush=True)
        return
    t = Table(box=box.SIMPLE_HEAD, caption="behind: entries of the leader's log it does not hold yet",
              caption_justify="left")
    for col in ("id", "address", "client", "http", "role", "leader", "behind"):
        t.add_column(col)
    for r in rows:
        role = r["role"] + (" (to be promoted)" if r.get("promote") else "")
        t.add_row(str(r["id"]), f"{r['ip']}:{r['port']}", str(r["client_port"]), str(r["http_port"]), role,
                  "yes" if r["leader"] else "", str(r.get("behind", "-")))
    out = Console()
    if not out.is_terminal:
        out = Console(width=200)
    out.print(t)


@member_app.command("list")
def member_list(config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                as_json: bool = typer.Option(False, "--json", help="One JSON object, for scripts."),
                timeout: float = TimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Every member: id, addresses, voter or learner, the leader, and how far each is behind the leader."""
    rep = _run_client(config, endpoints, timeout, lambda c: c.members(), keys)
    _print_members(rep["members"], rep.get("leader"), as_json)


@member_app.command("add")
def member_add(
    node_id: int = NodeIdArgNew,
    ip: str = typer.Option(..., "--ip", help="The new node's address."),
    port: int = typer.Option(..., "--port", help="Its peer port."),
    client_port: int | None = typer.Option(None, "--client-port", help="Its client port (default: port+100)."),
    http_port: int | None = typer.Option(None, "--http-port", help="Its HTTP port (default: port+200)."),
    learner: bool = typer.Option(False, "--learner", help="Keep it a learner (never votes) instead of "
                                                         "promoting it to voter once it has caught up."),
    config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt, timeout: float = MemberTimeoutOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the membership as JSON."),
    keys: Path | None = KeysOpt,
) -> None:
    """Add a member through the leader; start it with `zraft node --id ID --join`. Returns once it is a voter
    (with --learner: once it is a learner)."""
    rep = _run_client(config, endpoints, timeout,
                      lambda c: c.change_members("add_member", node_id, ip=ip, port=port, client_port=client_port,
                                                 http_port=http_port, learner=learner), keys)
    if as_json:
        _print_members(rep["members"], rep.get("leader"), as_json)
    else:
        print(f"node {node_id} is a {'learner' if learner else 'voter'} now")


@member_app.command("remove")
def member_remove(node_id: int = NodeIdArgNew, config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt,
                  timeout: float = MemberTimeoutOpt, keys: Path | None = KeysOpt) -> None:
    """Take a member out (the leader too: it hands over once the change is committed). Stop its process after."""
    _run_client(config, endpoints, timeout, lambda c: c.remove_member(node_id), keys)
    print(f"node {node_id} is no longer a member; stop its process")


@member_app.command("promote")
def member_promote(node_id: int = NodeIdArgNew, config: Path = ConfigOpt,
                   endpoints: list[str] | None = EndpointsOpt, timeout: float = MemberTimeoutOpt,
                   keys: Path | None = KeysOpt) -> None:
    """Make a learner a voter."""
    _run_client(config, endpoints, timeout, lambda c: c.promote_member(node_id), keys)
    print(f"node {node_id} is a voter now")


@member_app.command("transfer-leader")
def member_transfer_leader(
    node_id: int | None = typer.Argument(None, help="The voter to hand leadership to (default: the most "
                                                   "up-to-date one)."),
    config: Path = ConfigOpt, endpoints: list[str] | None = EndpointsOpt, timeout: float = TimeoutOpt,
    keys: Path | None = KeysOpt,
) -> None:
    """Hand leadership over (thesis 3.10: no election timeout lost) and return once the new leader leads."""
    if node_id is not None:
        _check_node_id(node_id)
    leader = _run_client(config, endpoints, timeout, lambda c: c.transfer_leader(node_id), keys)
    print(f"node {leader} leads")


# ---------------------------------------------------------------------- snapshot


def _leader_endpoint(eps: list[str], config: Path, keys: Path | None) -> str:
    with _client(config, None, keys, only=eps) as c:
        statuses = c.statuses(1.0)
    for ep, st in zip(eps, statuses, strict=False):
        if st and st.get("role") == "leader":
            return ep
    raise _fail("no leader answers (is the cluster up, with a majority?); name a node with --endpoint", 2)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@snapshot_app.command("save")
def snapshot_save(
    file: Path = typer.Argument(..., help="Where to write the backup (written to FILE.tmp, then renamed)."),
    config: Path = ConfigOpt,
    endpoint: str | None = typer.Option(None, "--endpoint", "-e",
                                        help="Take it from this node (tcp://IP:PORT). Default: the leader."),
    timeout: float = TimeoutOpt,
    keys: Path | None = KeysOpt,
) -> None:
    """Write a point-in-time copy of the cluster's data to FILE, with a SHA-256 checksum (like etcdctl)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from zraft.tools.backup import BackupError, save

    ep = _endpoints(config, [endpoint])[0] if endpoint else _leader_endpoint(_endpoints(config, None), config, keys)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True) as bar:
            task = bar.add_task(f"reading from {ep}")
            info = save(ep, file, timeout=timeout, progress=lambda r, b: bar.update(
                task, description=f"reading from {ep}: {r:,} records, {_human(b)}"), keys=_ring(config, keys))
    except (BackupError, OSError) as exc:
        raise _fail(f"snapshot save failed: {exc}") from None
    print(f"saved {file}: index {info.index}, term {info.term}, {info.records:,} records, {_human(info.bytes)} "
          f"(from node {info.node})")


@snapshot_app.command("restore")
def snapshot_restore(
    file: Path = typer.Argument(..., help="A backup made by `zraft snapshot save`."),
    data_dir: Path = typer.Option(..., "--data-dir", "-d", help="A fresh data dir for the new cluster."),
    config: Path = ConfigOpt,
    ids: list[int] | None = typer.Option(None, "--id", "-i",
                                         help="Restore only this node (repeat for several). Default: every node "
                                              "in --config."),
) -> None:
    """Check FILE's checksum, then create every node's database in DATA_DIR from it.

    Start the cluster on DATA_DIR afterwards (`zraft cluster up --data-dir DATA_DIR`).
    """
    from zraft.tools.backup import BackupError, restore

    cluster = _load(config)
    wanted = ids or cluster.ids
    for i in wanted:
        if i not in cluster.ids:
            raise _fail(f"no node {i} in {config} (ids: {cluster.ids})")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                      transient=True) as bar:
            task = bar.add_task(f"verifying {file.name}, then writing node databases", total=len(wanted))
            info = restore(file, [data_dir / str(i) for i in wanted], progress=lambda n: bar.advance(task, n))
    except (BackupError, OSError) as exc:
        raise _fail(f"snapshot restore failed: {exc}") from None
    print(f"restored {file} (index {info.index}, term {info.term}, {info.records:,} records) into "
          f"{data_dir} for node(s) {', '.join(map(str, wanted))}")


@snapshot_app.command("info")
def snapshot_info(file: Path = typer.Argument(..., help="A backup file.")) -> None:
    """Verify a backup file end to end and describe it."""
    import datetime

    from zraft.tools.backup import BackupError, verify

    try:
        info = verify(file)
    except BackupError as exc:
        raise _fail(str(exc)) from None
    when = datetime.datetime.fromtimestamp(info.created).isoformat(timespec="seconds") if info.created else "?"
    print(f"{file}: OK (checksum verified); index {info.index}, term {info.term}, {info.records:,} records, "
          f"{_human(info.bytes)}, taken from node {info.node} at {when}")


@snapshot_app.command("compact")
def snapshot_compact(nodes: list[int] | None = typer.Argument(None, help="Node ids (default: all)."),
                     config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Compact the log of the given nodes now, up to what they have applied (they also do it on their own)."""
    cluster = _load(config)
    failed = False
    for i in nodes or cluster.ids:
        try:
            ep = cluster.node(i).client_endpoint
        except ConfigError as exc:
            raise _fail(str(exc)) from None
        with _client(config, None, keys, only=[ep]) as c:
            rep = c.request(ep, {"op": "compact"}, timeout=5.0)
        if rep is None or not rep.get("ok"):
            failed = True
            err.print(f"node {i}: [red]{'no answer' if rep is None else rep.get('message')}[/]")
        else:
            print(f"node {i}: log begins after {rep['snapshot_index']} (applied {rep['applied_index']})")
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------- fault


def _fault(config: Path, node_ids: list[int], req: dict, keys: Path | None) -> None:
    cluster = _load(config)
    ids = node_ids or cluster.ids
    try:
        eps = {i: cluster.node(i).client_endpoint for i in ids}
        for peer in req.get("peers") or ():
            cluster.node(peer)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    client = _client(config, None, keys, only=list(eps.values()))
    failed = False
    for node_id, ep in eps.items():
        rep = client.request(ep, {"op": "fault", **req}, timeout=2.0)
        if rep is None:
            err.print(f"node {node_id}: no answer")
            failed = True
        elif not rep.get("ok"):
            err.print(f"node {node_id}: {rep.get('error')}: {rep.get('message')}")
            failed = True
        else:
            print(f"node {node_id}: {json.dumps(rep['faults'])}")
    if failed:
        raise typer.Exit(2)


NodesArg = typer.Argument(None, help="Node ids (default: every node in Config.txt).")


@fault_app.command("isolate")
def fault_isolate(node_id: int = typer.Argument(..., help="The node to cut off."),
                  peers: list[int] | None = typer.Option(None, "--from", help="Cut it off from this peer only; "
                                                            "repeat for several. Default: from all peers."),
                  config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Partition node N from some or all of its peers, both directions."""
    _fault(config, [node_id], {"action": "isolate", "peers": peers or None}, keys)


@fault_app.command("heal")
def fault_heal(nodes: list[int] | None = NodesArg, config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Undo every isolation on the given nodes."""
    _fault(config, nodes or [], {"action": "heal", "peers": None}, keys)


@fault_app.command("drop")
def fault_drop(node_id: int, rate: float = typer.Argument(..., help="Fraction 0..1 of peer frames to drop, "
                                                          "each direction."), config: Path = ConfigOpt,
               keys: Path | None = KeysOpt) -> None:
    """Drop a fraction of node N's peer messages."""
    _fault(config, [node_id], {"action": "drop", "rate": rate}, keys)


@fault_app.command("delay")
def fault_delay(node_id: int, delay_ms: float = typer.Argument(..., help="Milliseconds."),
                config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Delay every message node N sends to its peers."""
    _fault(config, [node_id], {"action": "delay", "delay_ms": delay_ms}, keys)


@fault_app.command("drop-replies")
def fault_drop_replies(node_id: int, count: int = typer.Argument(..., help="How many."),
                       config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Apply the next COUNT writes on node N but lose their replies (to test client retries)."""
    if not 0 <= count <= 1_000_000_000:
        raise _fail(f"COUNT must be from 0 to 1000000000, got {count}")
    _fault(config, [node_id], {"action": "drop_replies", "count": count}, keys)


@fault_app.command("clear")
def fault_clear(nodes: list[int] | None = NodesArg, config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Remove every injected fault from the given nodes."""
    _fault(config, nodes or [], {"action": "clear"}, keys)


@fault_app.command("show")
def fault_show(nodes: list[int] | None = NodesArg, config: Path = ConfigOpt, keys: Path | None = KeysOpt) -> None:
    """Show the faults in force on each node."""
    _fault(config, nodes or [], {"action": "show"}, keys)


# ---------------------------------------------------------------------- keys


keys_app = typer.Typer(help="CURVE keys: authentication and encryption for nodes, clients and the HTTP API.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(directory: Path = typer.Argument(..., help="Where to write the keys (made if missing)."),
              config: Path = ConfigOpt) -> None:
    """Write a keypair for every node of Config.txt, one for clients, and the HTTP token (never overwrites).

    Then start every node and run every command with --keys DIR (or ZRAFT_KEYS=DIR). Each host needs
    only its own secret key (nodeN.key_secret; client.key_secret for clients) and the public keys.
    """
    from zraft.cluster.keys import KeysError, init_keys

    try:
        written = init_keys(directory, _load(config))
    except (KeysError, OSError) as exc:
        raise _fail(f"keys init failed: {exc}") from None
    for p in written:
        print(p)


@keys_app.command("add")
def keys_add(directory: Path = typer.Argument(..., help="The keys directory `zraft keys init` made."),
             node_id: int = typer.Option(..., "--id", help="The id of the member to be added.")) -> None:
    """Write a keypair for one more node, a member to be added (`zraft member add`); never overwrites.

    Copy DIR/nodeID.key (the public key) into every host's keys directory and DIR/nodeID.key_secret to
    the new node's host only; the running nodes read the new public key when they first need it.
    """
    from zraft.cluster.keys import KeysError, add_node_key

    _check_node_id(node_id)
    try:
        written = add_node_key(directory, node_id)
    except (KeysError, OSError) as exc:
        raise _fail(f"keys add failed: {exc}") from None
    for p in written:
        print(p)


# ---------------------------------------------------------------------- bench


@app.command()
def bench(
    config: Path = ConfigOpt,
    endpoints: list[str] | None = EndpointsOpt,
    clients: int = typer.Option(32, "--clients", "-C", min=1, help="Client processes, one request in flight each."),
    duration: float = typer.Option(10.0, "--duration", "-T", min=0.1, help="Recorded seconds per phase."),
    warmup: float = typer.Option(1.0, "--warmup", min=0.0, help="Unrecorded seconds before each phase."),
    phases: str = typer.Option("put,get", "--phases", help="Comma-separated: put, get, mixed (50/50)."),
    keys: int = typer.Option(10_000, "--keys", min=1, help="Key space size."),
    value_size: int = typer.Option(128, "--value-size", min=0, help="Bytes per value."),
    key_size: int = typer.Option(16, "--key-size", min=8, help="Bytes per key."),
    preload_keys: bool = typer.Option(True, "--preload/--no-preload", help="Write every key once first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per phase, for scripts."),
    spawn: int = typer.Option(0, "--spawn", min=0, help="Bring up a cluster of this many nodes in a temporary "
                                                         "dir for the run (and tear it down after), instead of "
                                                         "using the running one of --config."),
    keys_dir: Path | None = typer.Option(None, "--keys-dir", envvar="ZRAFT_KEYS",
                                         help="The cluster's keys directory (what --keys is for every other "
                                              "command; here --keys is the key space)."),
) -> None:
    """Measure throughput and latency against a running cluster (closed-loop client processes)."""
    from zraft.tools import bench as zb

    if spawn:
        from zraft.cluster.local import LocalCluster

        err.print(f"starting a {spawn}-node cluster in a temporary dir...")
        with LocalCluster(spawn, log_level="WARNING") as c:
            c.start_all()
            c.wait_for_leader(30)
            _bench(zb, c.endpoints, clients, duration, warmup, phases, keys, value_size, key_size, preload_keys,
                   as_json, None)
        return
    _bench(zb, _endpoints(config, endpoints), clients, duration, warmup, phases, keys, value_size, key_size,
           preload_keys, as_json, _ring(config, keys_dir))


def _bench(zb, endpoints: list[str], clients: int, duration: float, warmup: float, phases: str, keys: int,
           value_size: int, key_size: int, preload_keys: bool, as_json: bool, ring) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    wanted = [p.strip() for p in phases.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in zb.PHASES]
    if unknown or not wanted:
        raise _fail(f"unknown phase(s) {unknown}; choose from {', '.join(zb.PHASES)}")
    curve = None if ring is None else (ring.own_public, ring.own_secret,
                                       {ep: ring.server_key(ep) for ep in endpoints})
    spec = zb.BenchSpec(tuple(endpoints), clients=clients, duration=duration, warmup=warmup,
                        keys=keys, key_size=key_size, value_size=value_size, curve=curve)
    try:
        leader = zb.find_leader(spec.endpoints, keys=ring)
    except RuntimeError as exc:
        raise _fail(str(exc)) from None
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), console=err,
                  transient=True, disable=as_json) as progress:
        if preload_keys:
            task = progress.add_task(f"preload {keys} keys", total=None)
            zb.preload(spec, leader)
            progress.remove_task(task)
        for phase in wanted:
            task = progress.add_task(f"{phase}: {clients} clients", total=warmup + duration)
            res = zb.run_phase(spec, phase, leader,
                               lambda done, total, t=task: progress.update(t, completed=done))
            progress.remove_task(task)
            results.append(res)
            if as_json:
                print(json.dumps(res.as_dict()), flush=True)
    if as_json:
        return
    t = Table(title=f"zraft bench: {clients} clients, {duration:g} s per phase, {value_size} B values, leader {leader}")
    for col in ("phase", "ops/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors", "client CPU (cores)"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    for r in results:
        t.add_row(r.phase, f"{r.ops_per_s:,.0f}", *(f"{v:.2f}" if v is not None else "-"
                                                   for v in (r.p50_ms, r.p90_ms, r.p99_ms, r.max_ms)),
                  str(r.errors), f"{r.client_cpu_cores:.2f}")
    Console().print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
