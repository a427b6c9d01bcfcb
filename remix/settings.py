"""A settings file's values as command-line flags would give them: the one typing that ``python -m server --config``
and ``python -m training.fit --config`` share (each reads YAML, whose values come typed by YAML's own rules), and the
tools' --help formatter."""

from __future__ import annotations

import argparse

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """A flag's true / false (also yes / no, on / off, 1 / 0); ValueError otherwise."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def flag_bool(text: str) -> bool:
    """parse_bool as an argparse ``type``: a bad word is argparse's error naming the flag and the word."""
    try:
        return parse_bool(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def typed_fields(loaded: dict, kinds: dict[str, type], list_items: str = "a list of names",
                 split_lists: bool = True) -> tuple[dict, list[str]]:
    """``loaded`` (field -> value, dashes or underscores; every field one of ``kinds``) with each value of the type its
    flag has, and a line naming each field whose value does not fit. An empty value (YAML's null) is left out, so the
    default stays; YAML reads unquoted on / off as booleans, which a string field gets back as "on" / "off"; a list
    field takes a list of strings or one string (split at commas where ``split_lists``; ``list_items`` says what its
    items are in a message); an integer field takes 4.0 but not 4.5; PyYAML's string for 1e-3 is a number."""
    want = {list: list_items, bool: "true or false", int: "an integer", float: "a number"}
    typed, bad = {}, []
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        kind = kinds[name]
        if value is None:
            continue
        try:
            if kind is list:
                items = (value.split(",") if split_lists else [value]) if isinstance(value, str) else value
                if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                    raise ValueError
                typed[name] = [t for t in items if t]
            elif kind is bool:
                typed[name] = value if isinstance(value, bool) else parse_bool(str(value))
            elif kind is str:
                typed[name] = ("on" if value else "off") if isinstance(value, bool) else str(value)
            elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            else:
                typed[name] = kind(value)
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError
        except ValueError:
            bad.append(f"{name}: expected {want[kind]}, got {value!r}")
    return typed, bad


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command-line tools' --help: the module docstring as written, and each option's default after its help
    (where it has one worth saying and the help does not already say it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if not action.option_strings or d is None or d is False or d is argparse.SUPPRESS or d in ("", [], {}) \
                or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"
