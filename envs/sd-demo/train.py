"""Trainer entry launched by train.sh through `accelerate launch`; see sd_trainer/cli.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
