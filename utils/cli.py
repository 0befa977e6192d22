"""What the entry scripts share on their command lines: the help format, --model_config and iMF's guidance flags."""

import argparse
import json
import os

from utils.errors import UserValueError


def parse_model_config(text: str | None) -> dict | None:
    """--model_config: a JSON object or the path of a JSON file."""
    if not text:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            source = f.read()
    else:
        source = text
    try:
        config = json.loads(source)
    except json.JSONDecodeError as err:
        raise UserValueError(f"--model_config {text!r} is neither a JSON file nor a JSON object ({err})") from err
    if not isinstance(config, dict):
        raise UserValueError(f"--model_config must be a JSON object of SongUNet arguments, got {text!r}")
    return config


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except unset ones (None) and off switches."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_guidance_flags(p: argparse.ArgumentParser, each: str) -> None:
    """--omega, --t_min, --t_max of sample.py and evaluate.py: iMF's guidance at sampling time, several values
    each (every combination is sampled; `each` says what a combination gives). Resolved, with their defaults,
    by training.build.sampling_guidance."""
    p.add_argument("--omega", type=float, nargs="+", default=None, metavar="W",
                   help=f"iMF networks: the guidance scale (1: none); several values: {each} (default: the "
                   "checkpoint's, or the authors' for their sizes: B/2 8.0, M/2 and L/2 10.5, XL/2 8.0; XL/2 at 2 steps "
                   "takes their 4.0 on [0.36, 0.64] before the checkpoint's)")
    p.add_argument("--t_min", type=float, nargs="+", default=None, metavar="T",
                   help=f"iMF networks: start of the guidance interval (several values: {each})")
    p.add_argument("--t_max", type=float, nargs="+", default=None, metavar="T",
                   help=f"iMF networks: end of the guidance interval (several values: {each})")
