"""Authentication and encryption: CurveZMQ keypairs for nodes and clients, and the HTTP token.

``zraft keys init DIR`` writes, with ZeroMQ's certificate files (zmq.auth) (``zraft keys add DIR
--id ID`` one more node's, for a member added later):

    DIR/node<ID>.key, DIR/node<ID>.key_secret   one keypair per node of Config.txt
    DIR/client.key, DIR/client.key_secret       the clients' keypair (more may be added: client*.key)
    DIR/http.token                              the bearer token of the HTTP API

A node started with ``--keys DIR`` (or ``ZRAFT_KEYS=DIR``) serves its peer port and its client
port over CURVE (everything encrypted) and lets in only the keys it knows: on the peer port the
nodes' public keys, on the client port the clients' and the nodes' (a node's HTTP gateway is a
client of the cluster). Every authenticated connection carries its user id (ZAP): ``node:<id>``
or ``client``; a peer's message is taken only from the connection of the node it claims to
come from. A node needs its own secret key and every public key; a client needs a client secret
key and the nodes' public keys; so a host holds only the secrets it uses.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from zraft.cluster.config import ClusterConfig

HTTP_TOKEN_FILE = "http.token"
PEER_DOMAIN = "zraft-peer"
CLIENT_DOMAIN = "zraft-client"


class KeysError(ValueError):
    """A keys directory that cannot be used as it is (the message says which file and why)."""


def node_key_name(node_id: int) -> str:
    return f"node{node_id}"


def init_keys(directory: str | os.PathLike, cluster: ClusterConfig) -> list[Path]:
    """Write a keypair for every node of ``cluster`` and one for clients, and the HTTP token, into
    ``directory`` (made if needed, mode 0700). Refuses to overwrite any of them. The files written."""
    d = Path(directory)
    names = [node_key_name(i) for i in cluster.ids] + ["client"]
    targets = [d / f"{n}.key" for n in names] + [d / f"{n}.key_secret" for n in names] + [d / HTTP_TOKEN_FILE]
    _refuse_overwrite(targets)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    written = [p for n in names for p in _write_keypair(d, n)]
    token = d / HTTP_TOKEN_FILE
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    written.append(token)
    return written


def add_node_key(directory: str | os.PathLike, node_id: int) -> list[Path]:
    """Write a keypair for one more node (a member to be added) into an existing keys directory,
    refusing to overwrite; the files written. Copy its public key to every host's directory: the
    nodes read it when they first need it."""
    d = Path(directory)
    if not d.is_dir():
        raise KeysError(f"keys directory {d} does not exist (make one with: zraft keys init {d})")
    name = node_key_name(node_id)
    _refuse_overwrite([d / f"{name}.key", d / f"{name}.key_secret"])
    return _write_keypair(d, name)


def _refuse_overwrite(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise KeysError(f"refusing to overwrite existing keys: {', '.join(existing)}")


def _write_keypair(d: Path, name: str) -> list[Path]:
    """``d/name.key`` and ``d/name.key_secret`` (mode 0600), ZeroMQ's certificate files."""
    public, secret = zmq.auth.create_certificates(str(d), name)
    os.chmod(secret, 0o600)
    return [Path(public), Path(secret)]


@dataclass
class KeyRing:
    """The keys one party (a node, or a client) uses: its own keypair and the public keys it knows."""

    directory: Path
    own_public: bytes  # z85
    own_secret: bytes  # z85
    node_public: dict[int, bytes]  # node id -> z85 public key
    client_public: set[bytes]  # z85 public keys of clients
    endpoint_nodes: dict[str, int] = field(default_factory=dict)  # client endpoint -> node id
    http_token: str | None = None
    _refreshed: float = field(default=-math.inf, repr=False)

    @classmethod
    def load(cls, directory: str | os.PathLike, cluster: ClusterConfig, node_id: int | None = None) -> KeyRing:
        """Node ``node_id``'s keys, or (None) a client's, from ``directory``; KeysError says what is missing."""
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise KeysError(f"{d} is not a directory: --keys names the directory that zraft keys init made")
        if not d.is_dir():
            raise KeysError(f"keys directory {d} does not exist (make one with: zraft keys init {d})")
        node_public = {i: _public(d / f"{node_key_name(i)}.key") for i in cluster.ids}
        clients = {_public(p) for p in sorted(d.glob("client*.key"))}
        if not clients:
            raise KeysError(f"no client key (client*.key) in {d}")
        own = d / f"{node_key_name(node_id) if node_id is not None else 'client'}.key_secret"
        public, secret = _keypair(own)
        token = d / HTTP_TOKEN_FILE
        try:
            http_token = token.read_text(encoding="utf-8").strip() if token.exists() else None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeysError(f"cannot read the HTTP token {token}: {getattr(exc, 'strerror', None) or exc}") from None
        return cls(d, public, secret, node_public, clients, {n.client_endpoint: n.id for n in cluster.nodes},
                   http_token)

    # --- sockets

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` (before bind) a CURVE server of ``domain``, with this party's keypair."""
        sock.curve_server = True
        sock.curve_publickey = self.own_public
        sock.curve_secretkey = self.own_secret
        sock.zap_domain = domain.encode()

    def connect_to(self, sock: zmq.Socket, server_public: bytes) -> None:
        """Make ``sock`` (before connect) a CURVE client of the server with that public key."""
        sock.curve_publickey = self.own_public
        sock.curve_secretkey = self.own_secret
        sock.curve_serverkey = server_public

    def server_key(self, endpoint: str) -> bytes:
        """The public key of the node serving ``endpoint`` (a client endpoint of Config.txt, or of a
        member learned with :meth:`learn_member`)."""
        node_id = self.endpoint_nodes.get(endpoint)
        if node_id is None:
            raise KeysError(f"no node of the cluster serves {endpoint}: no key to check it with")
        return self.node_key(node_id)

    def node_key(self, node_id: int) -> bytes:
        """Node ``node_id``'s public key: known since the start, or read now from the directory (a
        member added later: ``zraft keys add DIR --id ID`` wrote it). KeysError if it is not there."""
        key = self.node_public.get(node_id)
        if key is None:
            key = self.node_public[node_id] = _public(self.directory / f"{node_key_name(node_id)}.key")
        return key

    def learn_member(self, node_id: int, client_endpoint: str) -> None:
        """A member the cluster told us of: its client endpoint is checked with its node key."""
        self.endpoint_nodes.setdefault(client_endpoint, node_id)

    def refresh_nodes(self, min_interval: float = 1.0) -> None:
        """Read the node public keys added to the directory since (at most once per ``min_interval`` s)."""
        now = time.monotonic()
        if now - self._refreshed < min_interval:
            return
        self._refreshed = now
        for path in sorted(self.directory.glob("node*.key")):
            digits = path.stem[len("node"):]
            if digits.isdigit() and int(digits) not in self.node_public:
                try:
                    self.node_public[int(digits)] = _public(path)
                except KeysError:
                    continue  # (half written: the next refresh reads it)

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """A started ZAP handler for ``ctx``: the peer port lets in nodes, the client port clients and nodes.
        A node key added to the directory later is let in too (members added at runtime)."""
        auth = _Authenticator(self, ctx)
        auth.start()
        auth.configure_curve_callback(PEER_DOMAIN, _Allowed(self, clients=False))
        auth.configure_curve_callback(CLIENT_DOMAIN, _Allowed(self, clients=True))
        return auth


class _Allowed:
    """A ZAP credentials provider: the node keys of the ring (and, ``clients``, the client keys)."""

    def __init__(self, ring: KeyRing, clients: bool) -> None:
        self.ring = ring
        self.clients = clients

    def _known(self, key: bytes) -> bool:
        return (self.clients and key in self.ring.client_public) or key in self.ring.node_public.values()

    def callback(self, _domain: str, key: bytes) -> bool:
        if self._known(key):
            return True
        self.ring.refresh_nodes()
        return self._known(key)


class _Authenticator(ThreadAuthenticator):
    """ZAP in a thread, naming each authenticated connection ``node:<id>`` or ``client`` (its User-Id)."""

    def __init__(self, ring: KeyRing, ctx: zmq.Context) -> None:
        super().__init__(ctx)
        self.ring = ring

    def curve_user_id(self, client_public_key: bytes) -> str:
        for i, k in list(self.ring.node_public.items()):
            if zmq.utils.z85.decode(k) == client_public_key:
                return f"node:{i}"
        return "client"


def _public(path: Path) -> bytes:
    if not path.exists():
        raise KeysError(f"missing public key {path} (zraft keys init writes one per node of Config.txt)")
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path} is not a key file: {exc}") from None
    return public


def _keypair(path: Path) -> tuple[bytes, bytes]:
    if not path.exists():
        raise KeysError(f"missing secret key {path}: this host cannot act as its owner")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path} is not a key file: {exc}") from None
    if secret is None:
        raise KeysError(f"{path} holds no secret key")
    return public, secret
