"""``python -m fastpool`` is the ``fastpool`` command."""

from fastpool.cli import main

raise SystemExit(main())
