"""``python -m influence_lib.experiments`` is the sweep command line."""

from .sweep import main

raise SystemExit(main())
