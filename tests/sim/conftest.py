"""tests/sim is a folder of test modules, not a package: make its helper module importable."""

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for path in (_HERE, _HERE.parent.parent):  # raftsim.py, and the repo root for `zraft`
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
