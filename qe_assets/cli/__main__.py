"""`python -m qe_assets.cli`."""

from qe_assets.cli import main

raise SystemExit(main())
