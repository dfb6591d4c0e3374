"""``python -m zraft.jepsen``: see :mod:`zraft.jepsen.runner`."""

import sys

from zraft.jepsen.runner import main

sys.exit(main())
