"""The Raft consensus core: pure, deterministic, no I/O (sans-I/O)."""
