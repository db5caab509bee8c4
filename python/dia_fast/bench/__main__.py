"""``python -m dia_fast.bench``: see :mod:`dia_fast.bench`."""

from . import main

raise SystemExit(main())
