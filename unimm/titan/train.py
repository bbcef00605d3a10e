"""Training entry point run by torchrun on every rank (``python -m unimm.titan.train``).

It is torchtitan's own ``train.main`` with one difference: configuration mistakes
(``ConfigError``) end the rank with a one-line message instead of a stack trace.
"""

from __future__ import annotations

import sys

from torchtitan.train import main as torchtitan_main

from unimm.errors import ConfigError
from unimm.titan import compat


def main() -> None:
    compat.apply()
    try:
        torchtitan_main()
    except ConfigError as err:
        print(f"unimm: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
