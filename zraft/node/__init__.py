"""One zraft node: the driver of the Raft core, its storage, transport, state machine and server loop."""
