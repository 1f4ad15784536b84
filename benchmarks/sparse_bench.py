"""Dense vs masked-dense vs sparse forward time; the same as ``gated bench`` (see models/bench.py).

    python benchmarks/sparse_bench.py [--json] [--models conv transformer-base] ...
"""

import sys

from models.bench import main

if __name__ == "__main__":
    sys.exit(main())
