"""Talking to a zraft cluster: the client library and the wire protocol it speaks.

    from zraft.client import Client
    from zraft.client.txn import value, put, get   # transactions (zraft.client.txn)
"""

from zraft.client.client import Client, OutcomeUnknown, RangeResult, ZraftError
from zraft.client.lease import Lease
from zraft.client.txn import Txn, TxnResult

__all__ = ["Client", "Lease", "OutcomeUnknown", "RangeResult", "Txn", "TxnResult", "ZraftError"]
