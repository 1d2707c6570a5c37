"""`python -m zenlm.cli ...` (and `torchrun ... -m zenlm.cli train ...`): the same as `zenlm ...`."""
import sys

from . import main

sys.exit(main())
