"""``python -m qlora_ref ...``: the ``qlora`` command, for launchers that start a module (``torchrun -m qlora_ref
finetune ...``)."""

import sys

from .cli import main

sys.exit(main())
