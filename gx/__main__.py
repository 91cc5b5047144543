"""`python -m gx ...` is the `gx` command."""
import sys

from gx.cli import main

sys.exit(main())
