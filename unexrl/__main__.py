"""`python -m unexrl` is the `unexrl` command."""

import sys

from unexrl.cli import main

sys.exit(main())
