"""Dense vs masked-dense vs sparse forward time; ``gated bench`` writing into results/.

    python benchmarks/sparse_bench.py [--json] [--models conv transformer-base stock-encoder] ...
"""

import sys

from common import RESULTS

from models.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(RESULTS)]
    sys.exit(main(argv))
