"""Command-line options from config dataclasses (declared with ``config.option``) and back.

:func:`add_config_args` adds an option per field; :func:`config_from_args` builds the config
from what was written, over a base (e.g. a bundle's profile) and the dataclass defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence

from ..config import PROFILE_SETTINGS, PipelineConfig, SplitConfig


PROFILED = "default: the bundle's profile, else"   # help of an option a bundle's profile may set


def add_config_args(parser: argparse.ArgumentParser, cls, *, prefix: str = "", skip: Sequence[str] = (),
                    profiled: Sequence[str] = ()) -> None:
    """Add an option for every field of a config dataclass declared with ``config.option``.

    The flag is ``--field-name`` (or the field's ``flags``), the help is the field's with its
    default. Every option starts unset (``argparse.SUPPRESS``), so :func:`config_from_args`
    tells a written option from a default. Booleans become ``--flag/--no-flag``; tuples take
    several values; ``X | None`` fields also take 'none'. ``prefix`` starts each destination
    (two configs of one command may share a field name). The help of a ``profiled`` field says
    that a bundle's profile (profiles.load_profile) sets it first.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or f.name in skip:
            continue
        shown = f.default if meta["shown"] is None else meta["shown"]
        default = f"{PROFILED} {'none' if shown is None else shown}" if f.name in profiled else f"default: {shown}"
        text = meta["help"] + (f" ({default})" if meta["shown"] != "" else "")
        kw = {"dest": prefix + f.name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        kind = hints[f.name]
        optional = _optional_inner(kind)
        if optional is not None:  # `int | None`: the value, or 'none'
            kw["type"] = _or_none(optional)
        elif kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(type=typing.get_args(kind)[0], nargs="+")
        else:
            kw["type"] = kind if kind in (int, float, str) else str
        parser.add_argument(*(meta["flags"] or ("--" + f.name.replace("_", "-"),)), **kw)


def _optional_inner(kind):
    """``X`` for an ``X | None`` field type (X int, float or str), else None."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return inner if inner in (int, float, str) else str
    return None


def _or_none(kind):
    """An argparse type: 'none' (any case) -> None, else ``kind(value)``."""
    def parse(value: str):
        return None if value.lower() == "none" else kind(value)
    parse.__name__ = kind.__name__
    return parse


def given_values(cls, args: argparse.Namespace, *, prefix: str = "") -> dict:
    """{field: value} of the options of ``cls`` written on the command line (:func:`add_config_args`)."""
    return {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}


def config_from_args(cls, args: argparse.Namespace, *, prefix: str = "", base: dict | None = None, **overrides):
    """``cls`` from the options written on the command line, over ``base`` (e.g. a bundle's profile),
    over the dataclass defaults; ``overrides`` win over all."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in (base or {}).items() if k in names}
    values.update(given_values(cls, args, prefix=prefix))
    values.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def split_config_from_args(args: argparse.Namespace) -> dict | None:
    """The split settings the user gave, as {field: value} for data.resolve_splits (None: none given;
    'none' counts as not given)."""
    given = {k: v for k, v in given_values(SplitConfig, args, prefix="split_").items() if v is not None}
    SplitConfig(**given)  # validate now: a clear error before any work
    return given or None


def pipeline_config(args: argparse.Namespace) -> PipelineConfig:
    """The PipelineConfig of a command with --base or --bundle (cli.add_pipeline_args)."""
    base = getattr(args, "base", None)   # --base (the real-* strategies' base) wins over --base-model
    return config_from_args(PipelineConfig, args, **({"model": base} if base else {}))


def fail(message: str) -> typing.NoReturn:
    """Stop with argparse's exit status 2 and a one-line error."""
    print(f"diffmix: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def profile_values(args: argparse.Namespace, bundle, configs: Sequence[type], **options) -> tuple[dict, dict]:
    """The bundle's profile (the user's saved overlay first, then the bundle's own) as {field: value}
    for the fields of ``configs`` (and the other ``options``, {name: value or None = not written})
    that the command line leaves unset, thresholds included where the command has them; and where
    each profile setting of the command came from, {name: "cli" / "profile" (the user's saved
    profile) / "bundle" (the bundle's own profile) / "default" (diffmix's)}."""
    from ..bundle import Profile
    from ..profiles import load_profile, profile_path, setting_sources, stray_profile

    profile = load_profile(bundle) if bundle is not None else Profile()
    values = {**profile.settings(), **profile.thresholds.as_dict()}
    known = {f.name for cls in configs for f in dataclasses.fields(cls)} | set(options)
    given = {k for cls in configs for k in given_values(cls, args)} | {k for k, v in options.items() if v is not None}
    used = {k: v for k, v in values.items() if k in known and k not in given}
    came = setting_sources(bundle) if bundle is not None else {}
    sources = {k: "cli" if k in given else came[k] if k in used else "default"
               for k in (*PROFILE_SETTINGS, *values) if k in known}
    if used:
        where = (f"your saved profile {profile_path(bundle)}" if profile.source == "saved profile"
                 else "the bundle's profile")
        print(f"from {where}: {', '.join(f'{k}={v}' for k, v in used.items())} (override on the command line)")
    old = stray_profile(bundle) if bundle is not None else None
    if old is not None:
        print(f"not read: {old}, a profile saved by an older diffmix in this folder; saved profiles now live in "
              f"{profile_path(bundle).parent} (move it there to use it)", file=sys.stderr)
    return used, sources
