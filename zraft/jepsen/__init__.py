"""Jepsen-style testing of zraft: a linearizability checker, a local cluster of node
processes, and a runner that records concurrent client histories while a nemesis
injects faults (``python -m zraft.jepsen --help``)."""
