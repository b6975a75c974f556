"""Train and evaluate from a recipe: `accelerate launch scripts/train.py --config configs/....yaml [overrides]`.

Runs the same code as `bonevision train`.
"""

import sys

from bonevision.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
