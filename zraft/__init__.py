"""zraft: a Raft-replicated key-value store over ZeroMQ, with LevelDB storage."""

__version__ = "0.1.0"

import logging as _logging

# A library's loggers stay quiet until the application configures logging (a node does: see
# zraft.node.server.setup_logging); without this, warnings would go to stderr by Python's last resort.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())
