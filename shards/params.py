"""Stage parameters declared once: a pydantic model feeds click options, YAML sections and validation.

A stage declares its parameters as a ``Params`` subclass (types, defaults,
ranges and the help text in ``Field(description=...)``). From that one model:

- ``click_options(Model)`` adds one ``--option`` per field to a command;
- ``from_cli(Model, kwargs)`` / ``parse(Model, mapping, where)`` validate what
  the command line or a YAML section gave, raising ``ConfigError`` that names
  the field (``curate.yaml: dedup.k: Input should be a valid integer (got 'lots')``);
- ``load_yaml`` reads a config file once (local or ``s3://``, ``yaml.safe_load``
  so no ``!!python`` tag runs) and ``parse_sections`` checks its sections.

Every parameter is validated before any work starts, so a typo or a wrong
type never turns into a run that "succeeds" with every row failed.
"""
from __future__ import annotations

import types
import typing
from typing import Any, Callable, Literal, Mapping, TypeVar, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

P = TypeVar("P", bound="Params")


class Params(BaseModel):
    """Base of every stage's parameter model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def as_record(self) -> dict[str, Any]:
        """JSON-ready values, as recorded in a manifest (a change restarts the stage's completion)."""
        return self.model_dump(mode="json")


def _describe(err: Mapping[str, Any], section: str | None) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    loc = f"{section}.{loc}" if section and loc else (section or loc or "value")
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        return f"{loc}: unknown key"
    if err.get("type") == "missing":
        return f"{loc}: required"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{loc}: {msg}{shown}"


def validation_message(e: ValidationError, where: str, section: str | None = None,
                       allowed: typing.Iterable[str] = ()) -> str:
    """One line naming every bad field of ``e``; unknown keys list the allowed ones."""
    errors = e.errors()
    parts = [_describe(err, section) for err in errors]
    if any(err.get("type") == "extra_forbidden" for err in errors) and allowed:
        parts.append(f"allowed: {', '.join(sorted(allowed))}")
    return f"{where}: " + "; ".join(parts)


def parse(model: type[P], data: Mapping[str, Any] | None, where: str = "config",
          section: str | None = None) -> P:
    """Validate ``data`` into ``model``; ``ConfigError`` names ``where``, the section and each bad field."""
    if data is not None and not isinstance(data, Mapping):
        label = f"`{section}`" if section else "the config"
        raise ConfigError(f"{where}: {label} must be a mapping of options, got {data!r}")
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as e:
        raise ConfigError(validation_message(e, where, section, model.model_fields)) from None


def load_yaml(source: str | Mapping[str, Any], what: str = "config") -> tuple[dict[str, Any], str]:
    """A config mapping from a YAML file (local or ``s3://``) or an in-memory dict.

    Returns ``(mapping, where)``; ``where`` names the file for error messages.
    """
    if isinstance(source, Mapping):
        return dict(source), what
    import yaml

    from . import storage

    try:
        raw = yaml.safe_load(storage.read_bytes(source).decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {source} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"{source} is not valid YAML: {' '.join(first[:3])}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of keys, got {type(raw).__name__}")
    return raw, source


def parse_sections(raw: Mapping[str, Any], models: Mapping[str, type[Params]], where: str,
                   top_level: typing.Iterable[str] = ()) -> dict[str, Params | None]:
    """Validate each ``section: {...}`` of ``raw`` with its model; ``section: false`` turns a step off (None).

    A section that is absent or ``true`` gets its defaults. Keys of ``raw`` that are
    neither sections nor ``top_level`` are refused, naming the allowed ones.
    """
    allowed = {*models, *top_level}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    out: dict[str, Params | None] = {}
    for name, model in models.items():
        sec = raw.get(name, {})
        if sec is False:
            out[name] = None
            continue
        out[name] = parse(model, {} if sec in (None, True) else sec, where, section=name)
    return out


# ---- click --------------------------------------------------------------------------------

def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, multiple?) for a field annotation; values stay strings where pydantic knows better."""
    import click

    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return click.Choice([str(a) for a in typing.get_args(tp)]), False
    if origin in (list, tuple, set):
        args = typing.get_args(tp)
        inner, _ = _click_type(args[0]) if args else (str, False)
        return inner, True
    if tp in (int, float, str):
        return tp, False
    return str, False


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def click_options(model: type[Params], *, exclude: typing.Iterable[str] = (),
                  required: typing.Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of ``model`` (help from the field's description).

    ``bool`` fields become ``--x/--no-x`` flags, ``Literal`` fields a choice,
    ``list`` fields repeatable options. Defaults are the model's, shown in
    ``--help``; pass the command's kwargs to ``from_cli`` to validate them.
    """
    import click

    skip, must = set(exclude), set(required)

    def decorate(f: Callable) -> Callable:
        for name, info in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            tp, _ = _unwrap_optional(info.annotation)
            help_ = info.description or ""
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            if tp is bool:
                f = click.option(f"{option_name(name)}/--no-{name.replace('_', '-')}", name,
                                 default=bool(default), show_default=True, help=help_)(f)
                continue
            ctype, multiple = _click_type(info.annotation)
            kw: dict[str, Any] = {"type": ctype, "help": help_, "show_default": default not in (None, [], ())}
            if multiple:
                kw.update(multiple=True, default=tuple(default or ()))
            else:
                kw["default"] = default
            kw["required"] = name in must or (info.is_required() and not multiple)
            f = click.option(option_name(name), name, **kw)(f)
        return f

    return decorate


def from_cli(model: type[P], kwargs: Mapping[str, Any], where: str = "options") -> P:
    """Validate the click kwargs that belong to ``model`` (others are ignored)."""
    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items() if k in model.model_fields}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        parts = [_describe(err, None) for err in e.errors()]
        parts = [option_name(p.split(":", 1)[0]) + ":" + p.split(":", 1)[1] if ":" in p else p for p in parts]
        raise ConfigError(f"{where}: " + "; ".join(parts)) from None


__all__ = ["Params", "parse", "parse_sections", "load_yaml", "click_options", "from_cli", "validation_message",
           "option_name"]
