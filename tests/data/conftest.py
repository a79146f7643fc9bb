from __future__ import annotations

import sys
from pathlib import Path

# Let the data tests import their small helper module without a package __init__.
sys.path.insert(0, str(Path(__file__).parent))
