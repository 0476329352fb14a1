"""``prefix-serve train --help``: every option says what happens when it is left out, and says it right."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields

from server.cli import train
from server.training.config import TrainConfig


def _train_options() -> list[argparse.Action]:
    commands = argparse.ArgumentParser().add_subparsers()
    train.register(commands)
    return [action for action in commands.choices["train"]._actions if action.dest != "help"]


def test_every_option_states_its_default() -> None:
    options = _train_options()
    assert len(options) > 20
    undocumented = [
        action.option_strings[0]
        for action in options
        if not action.help or not ("(default: " in action.help or action.help.endswith("(required)"))
    ]
    assert undocumented == []


def test_the_stated_defaults_are_the_configs() -> None:
    defaults = {field.name: field.default for field in fields(TrainConfig)}
    checked = 0
    for action in _train_options():
        stated = re.search(r"\(default: ([^;,)]+)", action.help or "")
        if action.dest not in defaults or stated is None:
            continue
        default, text = defaults[action.dest], stated.group(1)
        if isinstance(default, bool):
            assert text == ("on" if default else "off"), action.dest
        elif isinstance(default, int | float):
            assert float(text) == default, action.dest
        elif isinstance(default, str):
            assert text == default, action.dest
        else:
            continue
        checked += 1
    assert checked >= 10
