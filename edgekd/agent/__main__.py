"""python -m edgekd.agent: the benchmark agent (see server.py)."""
import sys

from .server import main

sys.exit(main())
