"""``python -m bench.serve_from CODE_DIR ARGS...``: ``coordinator ARGS...`` with the
``coordinator`` and ``workers`` packages found in CODE_DIR (another revision's, checked
out by bench/compare.py) ahead of this repository's. Imports nothing of either first.
"""

import sys

if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    from coordinator.cli import main

    sys.exit(main(sys.argv[2:]))
