"""``python -m optimum_vim ...`` is the ``optimum-vim`` command (useful where pip's script folder is not on PATH)."""

from .cli import main

raise SystemExit(main())
