"""``python -m brownout_jax.cli``: the same as the ``brownout-jax`` command."""

import sys

from brownout_jax.cli.main import main

sys.exit(main())
