"""`python train.py --config config/config.json` (what train.sh's `accelerate launch` runs).

Exit codes: 0 done, 1 data/model/runtime error, 2 config error, 130 stopped by
SIGTERM/SIGINT (after writing a checkpoint). Errors end with one line on stderr and
an `{"event": "error", ...}` line on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

EXIT_ERROR, EXIT_CONFIG = 1, 2


def _setup_logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s sd-trainer %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "accelerate", "peft", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    status_file = os.environ.get("SD_DEMO_STATUS_FILE")
    if status_file and os.environ.get("RANK", "0") == "0":
        try:
            Path(status_file).write_text(f"{code}\n")
        except OSError:
            pass
    return code


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="SD3 LoRA trainer reading SimpleTuner config files")
    parser.add_argument("--config", type=Path, default=Path("config/config.json"), help="SimpleTuner config.json")
    args = parser.parse_args(argv)
    _setup_logging()
    log = logging.getLogger("sd_trainer")

    from .loop import StopFlag

    stop = StopFlag()

    def on_signal(signum, _frame):
        if not stop():
            log.warning("received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name)
        stop.request(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    from . import events
    from .config import ConfigError, load_config
    from .data import DataError
    from .dataset_prep import DatasetError
    from .device import DeviceError
    from .loop import TrainingError
    from .model import ModelError

    try:
        config = load_config(args.config)
        from .loop import train

        return train(config, stop)
    except ConfigError as error:
        code, message = EXIT_CONFIG, str(error)
    except (DataError, DatasetError, DeviceError, ModelError, TrainingError, FileNotFoundError) as error:
        code, message = EXIT_ERROR, str(error)
    except KeyboardInterrupt:
        return 130
    print(f"sd-trainer: error: {message}", file=sys.stderr, flush=True)
    events.emit("error", message=message)
    return code
