"""`python -m minqwen …` is the same as the `minqwen` command."""

from .cli import main

raise SystemExit(main())
