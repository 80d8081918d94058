"""config.py: one dataclass is a program's whole configuration. Its fields are the flags (`--n_layer 6`,
`--n_layer=6`, bare `--flag` for booleans), `--config file.toml` supplies values first (read with tomllib, never
executed), and an unknown flag or a wrong type is a one-line error naming the closest fields. train.py and
reason_rl.py share it.
"""
import difflib
import sys
import tomllib
from dataclasses import fields

from data.loader import DataError


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing saved is touched."""


def _convert(name, typ, value):
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if typ is bool and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        try:
            if typ in (int, float):
                return typ(value)
        except ValueError:
            pass
        if typ is str:
            return value
    raise UserError(f"--{name} expects {typ.__name__}, got {value!r}")


def parse_config(cls, argv):
    """(config, names set explicitly) from `--key value`, `--key=value`, bare `--flag` (bools) and
    `--config file.toml`. Unknown keys are errors that name the closest fields."""
    types = {f.name: f.type for f in fields(cls)}
    given, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}: flags look like --name value or --name=value")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            elif types.get(key) is bool:
                val = "true"
            elif key in types or key == "config":
                raise UserError(f"--{key} needs a value")
        given[key] = val
        i += 1
    values = {}
    if "config" in given:
        path = given.pop("config")
        try:
            with open(path, "rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError:
            raise UserError(f"config file {path} not found")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not valid TOML: {str(e).splitlines()[0]}")
        except IsADirectoryError:
            raise UserError(f"config file {path} is a directory")
    values.update(given)
    for key in values:
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else "; see TrainConfig in the file"
            raise UserError(f"unknown flag --{key}{hint}")
    cfg = cls(**{k: _convert(k, types[k], v) for k, v in values.items()})
    return cfg, set(values)


def cli(cls, entry, argv=None):
    """Flags -> cls -> entry(cfg, explicit); bad input is one line on stderr and exit status 2 (reason_rl.py too)."""
    try:
        cfg, explicit = parse_config(cls, sys.argv[1:] if argv is None else argv)
        entry(cfg, explicit)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact", file=sys.stderr)
        sys.exit(130)
