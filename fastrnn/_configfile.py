"""TOML config files for ``fastrnn train --config FILE.toml``.

Format: every key is a long option of ``fastrnn train`` without its dashes,
spelt with dashes or underscores (``time-budget = 900`` or ``time_budget =
900``), plus ``textfile`` for the positional argument. Values have the
option's type: an integer, a float (an integer is fine where a float is
expected), a string for a choice or a path, ``true``/``false`` for a switch
(``locked-dropout = true``). Keys may be grouped in the tables of ``--help``
(``[model]``, ``[regularisation]``, ``[data]``, ``[optimisation]``,
``[schedule]``, ``[run]``; the American spellings work too); each key may be
given once. Paths are relative to the current directory, as on the command
line. ``fastrnn train ... --print-config`` prints the effective options in
this format.

Precedence: an option given on the command line beats the file, which beats
the built-in default. An unknown key or table, a value of the wrong type or
out of range raises :class:`ConfigFileError` naming the file, the key, what
was expected and what was found.

Python 3.11+ reads TOML with the standard library's ``tomllib``; older ones
with the ``tomli`` backport (a dependency there).
"""

import argparse
import difflib
import json

__all__ = ["ConfigFileError", "load_toml", "read_config", "apply_config_file",
           "config_to_toml"]

# tables that may group keys (the --help groups), with their American spellings
TABLES = {"model": "model", "regularisation": "regularisation",
          "regularization": "regularisation", "data": "data", "optimisation": "optimisation",
          "optimization": "optimisation", "schedule": "schedule", "run": "run"}
# options that make no sense inside a config file
_NOT_IN_FILE = {"help", "config", "print_config"}


class ConfigFileError(ValueError):
    """A config file is missing, not TOML, or holds an unknown key or a bad value."""


def load_toml(path):
    """Parse a TOML file -> dict (ConfigFileError for a missing file or bad TOML)."""
    try:
        import tomllib
    except ImportError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read the config file "
                              f"({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigFileError(f"{path}: not UTF-8 text ({e})") from None


def _actions(parser):
    """key (dest and option names without dashes) -> action, for the options a file may set."""
    index = {}
    for a in parser._actions:
        if a.dest in _NOT_IN_FILE or a.dest is argparse.SUPPRESS:
            continue
        index[a.dest] = a
        for opt in a.option_strings:
            if opt.startswith("--"):
                index[opt[2:]] = a
    return index


def _flatten(path, doc):
    """-> [(key, value)], the keys of the top level and of the allowed tables."""
    items = []
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in TABLES:
                raise ConfigFileError(
                    f"{path}: unknown table [{key}]; tables may be "
                    f"{', '.join('[' + t + ']' for t in dict.fromkeys(TABLES.values()))} "
                    f"(or keys at the top level)")
            for k, v in value.items():
                if isinstance(v, dict):
                    raise ConfigFileError(f"{path}: [{key}.{k}]: tables do not nest; "
                                          f"expected a value for {k!r}")
                items.append((k, v, f"[{key}] {k}"))
        else:
            items.append((key, value, key))
    return items


def _type_name(v):
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array"}.get(type(v), type(v).__name__)


def _convert(path, where, action, value):
    """A TOML value for `action` -> the Python value argparse would have produced."""
    # by name: the cli module may also run as __main__ (python -m fastrnn.cli), with
    # its own copy of _weight_fraction; the others are fastrnn._argtypes'
    int_types = ("int", "positive_int", "nonneg_int", "thread_count")
    float_types = ("float", "nonneg_float", "fraction", "positive_float", "_weight_fraction")
    tname = getattr(action.type, "__name__", None)

    def bad(expected):
        return ConfigFileError(f"{path}: {where}: expected {expected}, got "
                               f"{_type_name(value)} {value!r}")

    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if action.type is None:
        if not isinstance(value, str):
            raise bad("one of " + ", ".join(map(repr, action.choices))
                      if action.choices else "a string")
        if action.choices and value not in action.choices:
            raise ConfigFileError(f"{path}: {where}: expected one of "
                                  f"{', '.join(map(repr, action.choices))}, got {value!r}")
        return value
    if tname in int_types:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        text = str(value)
    elif tname in float_types:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        text = repr(float(value))
    else:  # pragma: no cover - an option type this module does not know yet
        raise ConfigFileError(f"{path}: {where}: cannot be set from a config file")
    try:
        return action.type(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigFileError(f"{path}: {where}: {e}") from None
    except ValueError:
        raise bad("a finite number") from None


def read_config(parser, path):
    """Read and check a config file against `parser` (the ``train`` sub-parser)
    -> {dest: value}."""
    doc = load_toml(path)
    index = _actions(parser)
    values, seen = {}, {}
    for key, value, where in _flatten(path, doc):
        action = index.get(key)
        if action is None:
            close = difflib.get_close_matches(key, [k for k in index if "_" not in k], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigFileError(
                f"{path}: unknown key {key!r}{hint}; the keys are the long options of "
                f"`fastrnn train --help` without their dashes, and textfile")
        if action.dest in seen:
            raise ConfigFileError(f"{path}: {where}: {action.dest} is already set "
                                  f"(as {seen[action.dest]})")
        seen[action.dest] = where
        values[action.dest] = _convert(path, where, action, value)
    return values


def apply_config_file(parser, path, argv):
    """Parse ``argv`` (the arguments after ``train``) with the file's values as
    defaults: command line > file > built-in defaults. -> argparse Namespace."""
    values = read_config(parser, path)
    parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.command = "train"
    args.config_values = values
    return args


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)   # a TOML basic string


def config_to_toml(parser, args):
    """The effective options of a parsed ``fastrnn train`` as a config file
    (options that are unset, e.g. no --time-budget, appear commented out)."""
    lines = ["# fastrnn train options (fastrnn train --config FILE.toml)"]
    if args.textfile is not None:
        lines.append(f"textfile = {_toml_value(args.textfile)}")
    for group in parser._action_groups:
        if group.title not in TABLES:
            continue
        lines += ["", f"[{group.title}]"]
        for a in group._group_actions:
            if a.dest in _NOT_IN_FILE:
                continue
            key = a.option_strings[0][2:]
            v = getattr(args, a.dest)
            lines.append(f"# {key} =  (not set)" if v is None else f"{key} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
