"""``python -m speechbrain_mamba.inference [args]``: ``speechbrain-mamba-separate``;
``python -m speechbrain_mamba.inference export [args]``: ``speechbrain-mamba-export``."""

import sys

from speechbrain_mamba.inference.cli import export_main, separate_main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(export_main(args[1:]) if args[:1] == ["export"] else separate_main(args))
