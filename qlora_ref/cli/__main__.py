"""``python -m qlora_ref.cli ...``: the ``qlora`` command (as ``python -m qlora_ref``)."""

import sys

from . import main

sys.exit(main())
