"""What the entry scripts share on their command lines: the help format and --model_config."""

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
