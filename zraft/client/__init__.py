"""Talking to a zraft cluster: the client library and the wire protocol it speaks.

    from zraft.client import Client
"""

from zraft.client.client import Client, OutcomeUnknown, ZraftError

__all__ = ["Client", "OutcomeUnknown", "ZraftError"]
