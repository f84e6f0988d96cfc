"""``python -m loratree`` (and ``torchrun -m loratree``) is the ``loratree`` command."""

import sys

from loratree.cli.main import main

sys.exit(main())
