from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
E2E_SERVER = str(ROOT / "tests" / "e2e_server.py")
PYTHON = sys.executable
