"""A dataset's profile (the strength, score thresholds and sampler settings someone chose
for a bundle), kept as a user overlay that never touches the bundle's files.

A bundle may ship its own ``profile`` in adapter.json (read-only here). What a user saves
goes to ``<output root>/profiles/<bundle name>-<bundle hash>.json``; readers (the app,
``diffmix translate`` and ``diffmix synthesize``) take the overlay first, then the
bundle's own profile. The bundle's bytes, and so its hash, never change.

The output root (:func:`output_root`) is one per-user folder, whatever folder a command runs
from: ``$DIFFMIX_OUTPUT`` when set, else the platform's data folder for diffmix
(``$XDG_DATA_HOME/diffmix``, i.e. ``~/.local/share/diffmix``, on Linux). Profiles an older
version saved under ``./outputs/profiles/`` of the working folder are not read; the CLI says so
once (:func:`stray_profile`).

Who may save, in the app: ``DIFFMIX_ALLOW_PROFILE_SAVE=1`` lets every visitor save, ``=0``
nobody. Unset, only a local user may: a visitor whose connection comes from this machine
(loopback address, no proxy or forwarding header: ``Forwarded``, ``X-Forwarded-*``,
``X-Real-IP``, ``CF-Connecting-IP``, ``True-Client-IP`` ... see ``PROXY_HEADERS``) on an app that is not a
Hugging Face Space (``SPACE_ID`` unset). Visitors of a shared server get the controls
without the save.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from .bundle import PROFILE_SETTINGS, Profile, check_profile
from .config import Thresholds
from .records import safe_name, write_text_atomic

OUTPUT_ENV = "DIFFMIX_OUTPUT"                  # output root: exports/ and profiles/ (default: user_data_dir())
SAVE_ENV = "DIFFMIX_ALLOW_PROFILE_SAVE"        # 1: anyone may save a profile in the app, 0: nobody
# Headers a proxy or CDN adds: a request carrying any of them came through one, so it is not local
# (``x-forwarded-*`` and ``x-original-*`` by prefix).
PROXY_HEADERS = ("forwarded", "via", "x-real-ip", "x-client-ip", "x-cluster-client-ip", "client-ip",
                 "cf-connecting-ip", "cf-connecting-ipv6", "true-client-ip", "fastly-client-ip",
                 "akamai-client-ip", "x-envoy-external-address", "x-appengine-user-ip", "x-azure-clientip",
                 "x-azure-socketip")
PROXY_PREFIXES = ("x-forwarded-", "x-original-", "x-proxy")
SETTINGS = tuple(k for k in PROFILE_SETTINGS if k != "strength")   # sampler settings a saved profile may hold


def output_root() -> Path:
    """Where diffmix keeps a user's files (saved profiles, the app's exports): ``$DIFFMIX_OUTPUT``
    when set, else :func:`user_data_dir`. Never relative to the working folder."""
    return Path(os.environ.get(OUTPUT_ENV) or user_data_dir()).expanduser().resolve()


def user_data_dir() -> Path:
    """The platform's per-user data folder for diffmix (platformdirs' when installed):
    ``$XDG_DATA_HOME/diffmix`` or ``~/.local/share/diffmix`` on Linux, ``~/Library/Application
    Support/diffmix`` on macOS, ``%LOCALAPPDATA%\\diffmix`` on Windows."""
    try:
        import platformdirs
    except ImportError:
        platformdirs = None
    if platformdirs is not None:
        return Path(platformdirs.user_data_dir("diffmix", appauthor=False))
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "diffmix"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "diffmix"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "diffmix"


def profile_path(bundle, root: str | os.PathLike | None = None) -> Path:
    """Where the user overlay of ``bundle`` lives: keyed by its folder name and hash."""
    return Path(root or output_root()) / "profiles" / f"{safe_name(bundle.path.name)}-{bundle.hash[:16]}.json"


def user_profile(bundle, root: str | os.PathLike | None = None) -> dict:
    """The saved overlay of ``bundle`` as written (checked like a bundle's own profile), {} when none."""
    path = profile_path(bundle, root)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the saved profile {path} ({err}); delete it to start over") from None
    check_profile(data, path)   # the same bounds as a bundle's own profile
    return data


def stray_profile(bundle, root: str | os.PathLike | None = None) -> Path | None:
    """A profile of ``bundle`` that an older diffmix saved under ``./outputs/profiles/`` of the
    working folder (no longer read), when there is one and it is not the output root's."""
    old = Path("outputs").resolve() / "profiles" / profile_path(bundle, root).name
    return old if old.is_file() and old != profile_path(bundle, root).resolve() else None


def load_profile(bundle, root: str | os.PathLike | None = None) -> Profile:
    """The profile in force: the user overlay's keys over the bundle's own ``profile``;
    ``source`` says where it came from ("saved profile" / "bundle profile" / "")."""
    own, overlay = dict(bundle.meta.get("profile") or {}), user_profile(bundle, root)
    source = "saved profile" if overlay else "bundle profile" if own else ""
    return Profile.from_dict({**own, **overlay}, profile_path(bundle, root) if overlay else "profile", source)


def save_profile(bundle, strength: float, thresholds: Thresholds | dict, settings: Mapping | None = None,
                 root: str | os.PathLike | None = None, calibration: Mapping | None = None) -> Path:
    """Write the overlay of ``bundle`` atomically; returns its path. The bundle is not touched.
    ``calibration``: the summary of the calibration the strength came from
    (calibrate.Calibration.profile_summary); without one, a saved profile holds none."""
    if strength is None or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"the profile strength must be in [0, 1], got {strength}")
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.from_dict(thresholds)
    unknown = set(settings or {}) - set(SETTINGS)
    if unknown:
        raise ValueError(f"unknown profile setting(s) {sorted(unknown)}; use {', '.join(SETTINGS)}")
    path = profile_path(bundle, root)
    profile = Profile.from_dict({"strength": float(strength), **dict(settings or {}),   # NaN, inf, range
                                 "calibration": None if calibration is None else dict(calibration)}, path)
    profile = dataclasses.replace(profile, thresholds=thresholds, extra={
        "bundle": str(bundle.path), "bundle_hash": bundle.hash, "saved": time.strftime("%Y-%m-%dT%H:%M:%S")})
    data = profile.to_dict()
    try:
        return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    except PermissionError as err:
        raise ValueError(f"cannot write the profile to {path} ({err.strerror}); set {OUTPUT_ENV} to a "
                         "writable folder") from None


def _loopback(client_host: str | None, headers: Mapping[str, str] | None) -> bool:
    """A request from this machine's loopback address with no proxy or forwarding header."""
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    try:
        local = client_host is not None and ipaddress.ip_address(client_host).is_loopback
    except ValueError:
        local = client_host == "localhost"
    return local and not any(h in PROXY_HEADERS or h.startswith(PROXY_PREFIXES) for h in headers)


def _save_switch() -> bool | None:
    """The operator's ``DIFFMIX_ALLOW_PROFILE_SAVE``: True (1/true/yes), False (0/false/no), else None."""
    flag = os.environ.get(SAVE_ENV, "").strip().lower()
    return True if flag in ("1", "true", "yes") else False if flag in ("0", "false", "no") else None


def saving_allowed(client_host: str | None, headers: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """(may this visitor save a profile, why) — see the module docstring."""
    switch = _save_switch()
    if switch:
        return True, f"{SAVE_ENV}=1"
    if switch is False:
        return False, f"saving profiles is turned off on this server ({SAVE_ENV}=0)"
    if os.environ.get("SPACE_ID"):
        return False, f"saving profiles is off on a shared Space (its operator can set {SAVE_ENV}=1)"
    if _loopback(client_host, headers):
        return True, "local user"
    return False, (f"saving profiles is only for a local user of this app; the operator of a shared server can "
                   f"set {SAVE_ENV}=1")


def local_visitor(client_host: str | None, headers: Mapping[str, str] | None = None) -> bool:
    """Is this the local user of the app (shown server paths, e.g. in a tile's command)? Not on a
    Space, nor on a server whose operator turned saving off (as ``diffmix app --share`` does), and
    only from the loopback address with no proxy header. ``DIFFMIX_ALLOW_PROFILE_SAVE=1`` lets
    visitors save; it does not make them local."""
    if os.environ.get("SPACE_ID") or _save_switch() is False:
        return False
    return _loopback(client_host, headers)


def setting_sources(bundle, root: str | os.PathLike | None = None) -> dict[str, str]:
    """{name: "profile" or "bundle"} for every setting and threshold :func:`load_profile` gives:
    "profile" when it comes from the user's saved overlay, "bundle" from the bundle's own."""
    own, overlay = bundle.profile, Profile.from_dict(user_profile(bundle, root))
    names = lambda p: {**p.settings(), **p.thresholds.as_dict()}   # noqa: E731
    return {**{k: "bundle" for k in names(own)}, **{k: "profile" for k in names(overlay)}}
