"""``python -m bench [options]``: the side-by-side runner, as ``fastrnn bench``.

Run from the repository root; ``python -m bench --help`` lists the options.
"""
import os
import sys

if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # benchmark the checkout, not some installed copy
        sys.path.insert(0, root)
    from fastrnn.benchmark.runner import main
    sys.exit(main())
