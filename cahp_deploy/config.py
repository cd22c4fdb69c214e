"""Typed stage configs: each stage's options declared once, with their flags, defaults, help and checks.

A stage config is a frozen dataclass whose fields are made by :func:`option`. That one declaration
gives everything else, the way Optimum's ``ORTConfig`` or ONNX Runtime's ``FusionOptions`` do:

* the stage command's click options (``ExportConfig.cli()``) and ``run``'s (``ExportConfig.cli(run=True)``):
  the same flags, defaults and help; in ``run`` a flag is renamed only where two stages would share it
  (``select --split`` is ``run --select-split``, ``recover --epochs`` is ``run --recover-epochs``), and a
  few options that only make sense for one command stay out of ``run``;
* :meth:`StageConfig.from_cli`: the config from the parsed values (or a Python caller's keywords),
  checked (:meth:`StageConfig.check`) with error messages that name the flag as the user typed it;
* :meth:`StageConfig.record`: a JSON-able dict, which is both what ``run.json`` records and the stage's
  cache key (a rerun skips a stage whose record and inputs hash as before).

Configs hold what the user chose; what a stage derives from the data (the serving length, the decision
rows) is not in them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import click

from cahp_deploy.errors import CahpError

C = TypeVar("C", bound="StageConfig")

#: one error rate for the whole run: the confidence of every bound the tool promises
#: (:mod:`cahp_deploy.paired` computes them)
DEFAULT_CONFIDENCE = 0.90


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line.

    ``name``: the stage command's flag (``--<field>`` by default); ``in_command`` False: an option of
    ``run`` only. ``run_name``: the flag in ``run`` (the same as ``name`` unless given; None: not an
    option of ``run``). ``off``: the second name of a
    boolean pair (``--per-tensor`` for ``--per-channel``; ``--no-<name>`` when True); ``only_off``: a
    boolean on by default that the flag turns off (``--no-timing``). ``parse``: turns the typed text
    into the value (e.g. "1,32" -> (1, 32)). ``dest``: the keyword it arrives as (from the flag's name
    by default: ``--recover-epochs`` -> ``recover_epochs``).
    """

    help: str
    name: str | None = None
    run_name: str | None | bool = True
    type: Any = None
    choices: tuple[str, ...] | None = None
    off: str | bool | None = None
    only_off: str | None = None
    multiple: bool = False
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None
    show_default: bool = True
    in_command: bool = True
    dest: str | None = None


def option(default: Any, help: str, **flag: Any) -> Any:
    """A config field with its command-line flag (see :class:`Flag`)."""
    return field(default=default, metadata={"flag": Flag(help=help, **flag)})


def int_tuple(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """"1,8,32" (or a sequence) -> (1, 8, 32); ValueError when an item is not an integer. Whether the
    values are usable (positive, not empty) is the stage's to say."""
    items = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    try:
        return tuple(int(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"takes comma-separated integers like 1,8,32, got {text!r}") from None


def _dest(flag_name: str) -> str:
    return flag_name.lstrip("-").replace("-", "_")


class StageConfig:
    """Base of the stage configs (frozen dataclasses whose fields come from :func:`option`)."""

    # -- flags ------------------------------------------------------------------------------------

    @classmethod
    def _flags(cls, run: bool, only: Iterable[str] | None = None) -> Iterable[tuple[dataclasses.Field, Flag, str]]:
        """(field, flag, flag name in this context) for every field that is an option there (of ``only``)."""
        only = None if only is None else set(only)
        for f in fields(cls):
            flag = f.metadata.get("flag")
            if flag is None or (only is not None and f.name not in only):
                continue
            name = flag.name or f"--{f.name.replace('_', '-')}"
            if not run and not flag.in_command:
                continue
            if run:
                if flag.run_name is None:
                    continue
                if isinstance(flag.run_name, str):
                    name = flag.run_name
            yield f, flag, name

    @classmethod
    def flag_name(cls, field_name: str, run: bool = False) -> str:
        """The flag that sets ``field_name`` (in ``run`` when ``run``)."""
        for f, _, name in cls._flags(run):
            if f.name == field_name:
                return name
        for f, _, name in cls._flags(False):
            if f.name == field_name:
                return name
        return f"--{field_name.replace('_', '-')}"

    @classmethod
    def cli(cls, run: bool = False, only: Iterable[str] | None = None) -> Callable:
        """A decorator adding this config's click options (``run``'s names when ``run``; the fields
        ``only``, when given: another command that shares some of them, e.g. ``study``)."""

        def decorate(command):
            for f, flag, name in reversed(list(cls._flags(run, only))):
                command = _click_option(f, flag, name)(command)
            return command

        return decorate

    @classmethod
    def from_cli(cls: type[C], values: dict[str, Any], run: bool = False, only: Iterable[str] | None = None,
                 **fixed: Any) -> C:
        """The config from parsed click values (popped from ``values``; missing ones take the default),
        plus ``fixed`` fields a command sets itself; checked."""
        kwargs = dict(fixed)
        for f, flag, name in cls._flags(run, only):
            dest = flag.dest or _dest(name)
            if dest in values:
                value = values.pop(dest)
                if flag.parse is not None and value is not None:
                    try:
                        value = flag.parse(value)
                    except ValueError as e:
                        raise CahpError(f"{name} {e}") from None
                if flag.multiple and value is not None:
                    value = tuple(value)
                kwargs[f.name] = value
        config = cls(**kwargs)
        object.__setattr__(config, "_run", run)
        config.check()
        return config

    # -- checks -----------------------------------------------------------------------------------

    def check(self) -> None:
        """Reject values that are wrong on their own (the stage checks what needs files)."""

    def _flag(self, field_name: str) -> str:
        return type(self).flag_name(field_name, getattr(self, "_run", False))

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CahpError(f"{self._flag(name)} must be positive, got {value}")

    def _at_least_zero(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise CahpError(f"{self._flag(name)} must be a finite number >= 0, got {value}")

    def _share(self, name: str) -> None:
        """A fraction in (0, 1]."""
        value = getattr(self, name)
        if value is not None and not 0.0 < value <= 1.0:
            raise CahpError(f"{self._flag(name)} must be in (0, 1], got {value}")

    # -- records ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """Every field, JSON-able (tuples as lists): run.json's record and the stage's cache key."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def replace(self: C, **changes: Any) -> C:
        new = dataclasses.replace(self, **changes)
        object.__setattr__(new, "_run", getattr(self, "_run", False))
        new.check()
        return new


@dataclass(frozen=True)
class ColumnsConfig(StageConfig):
    """Which columns of the data are read: every command that reads labelled data takes these."""

    text_column: str | None = option(None, "Text column [default: text, or premise/hypothesis when present].")
    text_pair_column: str | None = option(None, "Second text column for pair tasks.")
    label_column: str = option("label", "Integer label column.")

    @property
    def columns(self) -> dict[str, Any]:
        return {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                "label_column": self.label_column}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, StageConfig):
        return value.record()
    return value


def _click_option(f: dataclasses.Field, flag: Flag, name: str):
    dest = flag.dest or _dest(name)
    default = f.default if f.default is not dataclasses.MISSING else None
    if flag.only_off is not None:  # a flag that turns off what is on by default: --no-timing
        return click.option(flag.only_off, dest, flag_value=False, default=True, help=flag.help)
    if flag.off is not None:
        off = f"--no-{name[2:]}" if flag.off is True else flag.off
        shown = default is not None and flag.show_default
        return click.option(f"{name}/{off}", dest, default=default, show_default=shown, help=flag.help)
    if isinstance(default, bool) or flag.type is bool:
        return click.option(name, dest, is_flag=True, default=bool(default), help=flag.help)
    kind = click.Choice(list(flag.choices)) if flag.choices else flag.type
    if flag.multiple:
        return click.option(name, dest, multiple=True, type=kind, help=flag.help)
    shown = flag.show_default and default is not None and not isinstance(default, tuple)
    text_default = ",".join(map(str, default)) if isinstance(default, tuple) and flag.parse else default
    kwargs: dict[str, Any] = dict(default=text_default, show_default=shown or (isinstance(default, tuple) and flag.show_default),
                                  help=flag.help)
    if kind is not None:
        kwargs["type"] = kind
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    return click.option(name, dest, **kwargs)


__all__ = ["ColumnsConfig", "DEFAULT_CONFIDENCE", "Flag", "StageConfig", "int_tuple", "option"]
