"""``python -m jlora_cli ARGS``: the ``jlora`` command."""

import sys

from jlora_cli import main

sys.exit(main())
