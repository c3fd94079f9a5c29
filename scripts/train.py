"""Entry point for `accelerate launch` (and plain `python`): the same job as `qat train`.

    accelerate launch scripts/train.py --config scripts/recipes/causal_lm_sft.yaml [--KEY VALUE ...]
    python scripts/train.py                      # the default all-MiniLM-L6-v2 W4 recipe
"""

import sys

from qat.trainers.run import main

if __name__ == "__main__":
    sys.exit(main())
