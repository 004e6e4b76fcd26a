"""Run the benchmark: the same code as `edge-agent bench` (all its flags apply).

.venv/bin/python scripts/bench.py --json bench.json --markdown docs/BENCHMARKS.md
"""

import sys

from edge_agent.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
