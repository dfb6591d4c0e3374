"""zraft: a Raft-replicated key-value store over ZeroMQ, with LevelDB storage."""

__version__ = "0.1.0"
