"""``python -m zraft``: the same as the ``zraft`` command."""

from zraft.cli import main

main()
