"""The Gradio app: pick a bundle and a source image, sweep strength, look at the
labelled grid and the scores, curate, tune the dataset's profile, export.

Nothing here computes: the handlers collect settings and call the app package
(diffmix_core/app: the session store, the process's cache, the sweep, the views; it
calls the same translate(), scoring and export writers as the CLI), then shape
the results for the components. Sessions keep only a token (gr.State, mirrored
in gr.BrowserState so a page reload finds the session again); images and
records live on disk in the session's folder.

The source that runs is whichever the user chose last: clicking an example clears
an upload, uploading clears the example, and only the user changes the classes.
"""
from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
from PIL import Image

from . import grid as G
from .app import guard
from .app.cache import (app_bundles, clip_scorer, generate, open_bundle_cached, open_typed_bundle, reference_for,
                        served_roots)
from .app.calibration import (DATASET, EXAMPLES, INTER, MAX_TEXT, SPLITS, CalibrationRequest, ProgressClock,
                              app_dataset, calibration_markdown, last_calibration, plan_calibration, run_calibration)
from .app.store import (UPLOADS, Limits, Store, check_upload, export_curated, open_store, prune_upload_cache,
                         public_record, sessions_root, update_curated)
from .app.sweep import (FAST_PREVIEW, SweepRequest, class_guesses, clean_thresholds, parse_strategies, passing, pick_partner,
                         plan_sweep, run_sweep)
from .app.views import (TABLE_COLUMNS, bundle_markdown, caption, clip_line, command_for, md_code, md_text, table,
                        write_csv)
from .bundle import Bundle, bundle_examples
from .calibrate import save_to_profile, translate_config_for
from .config import STRATEGIES, THRESHOLD_TESTS, DiffIIConfig, Thresholds, TranslateConfig
from .data import load_image
from .jobs import ALL_OTHER, parse_seeds
from .profiles import load_profile, local_visitor, output_root, save_profile, saving_allowed
from .records import safe_name, save_png
from .scoring import plot_sweep, recommendation_bar
from .translate import Source, strategy_unavailable

try:   # ZeroGPU on Hugging Face Spaces; a no-op elsewhere
    import spaces

    GPU = spaces.GPU
except ImportError:
    def GPU(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

_generate = GPU(generate)
# The six threshold boxes, in Thresholds' field order (THRESHOLD_TESTS' keys): "min P(target)", ...
TH_KEYS = tuple(THRESHOLD_TESTS)
TH_LABELS = tuple(f"{key.split('_')[0]} {THRESHOLD_TESTS[key][2]}" for key in TH_KEYS)
log = logging.getLogger("diffmix.app")


def _user_error(err: Exception, where: str) -> gr.Error:
    """A user's mistake: one log line (no traceback) and a message in the page (escaped: it may
    quote a class name or other text from a bundle, and the page renders HTML)."""
    log.warning("%s: %s", where, err)   # the log keeps the server's paths; the visitor's message does not
    return gr.Error(html.escape(public_text(str(err)), quote=False), print_exception=False)


def public_text(text: str) -> str:
    """``text`` without the server's folders: paths under Gradio's cache, the sessions, the output
    root, the bundle folders or the working directory are shown relative to them."""
    roots = [gr.utils.get_upload_folder(), sessions_root(), output_root(), *served_roots(), Path.cwd()]
    for root in sorted({str(Path(r).resolve()) for r in roots} | {str(r) for r in roots}, key=len, reverse=True):
        text = text.replace(root.rstrip("/") + "/", "")
    return text


def _errors(fn):
    """Library errors (ValueError / FileNotFoundError) become a gr.Error the user can read."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        _tidy_gradio_cache()
        try:
            guard.check_call(wrapped, args, kwargs)   # types and lengths first (app/guard.py)
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            raise _user_error(err, fn.__name__) from None
    return wrapped


_ACCEPTED: set[str] = set()       # uploads a handler took (Gradio's cache keeps them within the bounds)
_UPLOAD_SETS: list[set[str]] = []  # each app's record of the files uploaded to it (gr.Blocks.upload_file_set)


def _tidy_gradio_cache() -> None:
    """Gradio's upload and output cache under the sessions' bounds (store.prune_upload_cache)."""
    uploads = set().union(*_UPLOAD_SETS)
    removed = prune_upload_cache(Path(gr.utils.get_upload_folder()), uploads, _ACCEPTED, Limits.from_env())
    gone = {str(p) for p in removed}
    for upload_set in _UPLOAD_SETS:
        upload_set -= gone


def _validator(fn):
    """``fn``'s Gradio validator: app/guard.py's checks of its inputs, run when a request joins
    the queue (outside every lane, the shared model lane included); a refused field is answered
    at once with its reason (one log line) and the request never waits for the lane."""
    def validate(*args):
        limits = Limits.from_env()
        named = guard.named_arguments(fn, args, {})
        verdicts = []
        for name, value in named.items():
            try:
                guard.check_field(name, value, limits)
                verdicts.append(gr.validate(True, ""))
            except ValueError as err:
                log.warning("%s: %s", fn.__name__, err)
                verdicts.append(gr.validate(False, str(err)))
        verdicts += [gr.validate(True, "")] * (len(args) - len(verdicts))
        return verdicts[0] if len(verdicts) == 1 else verdicts
    return validate


def guard_events(demo: gr.Blocks) -> None:
    """Give every event of ``demo`` the validator of its handler (:func:`_validator`)."""
    for block_fn in demo.fns.values():
        if block_fn.fn is not None and block_fn.validator is None and not block_fn.is_validator_function:
            block_fn.validator = _validator(block_fn.fn)


def takes_thresholds(fn):
    """Gradio passes a handler its inputs by position and names the API's parameters after the
    handler's: ``fn`` takes one ``thresholds: Thresholds`` parameter, and Gradio sees in its
    place the six threshold boxes (TH_KEYS, in Thresholds' field order; empty = off)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("thresholds")
    boxes = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="float | None")
             for k in TH_KEYS]

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        values = args[at:at + len(TH_KEYS)]
        thresholds = Thresholds.from_dict(dict(zip(TH_KEYS, values)))
        return fn(*args[:at], thresholds, *args[at + len(TH_KEYS):], **kwargs)

    wrapped.__signature__ = sig.replace(parameters=params[:at] + boxes + params[at + 1:])
    wrapped.__annotations__ = {**{k: "float | None" for k in TH_KEYS},
                               **{k: v for k, v in fn.__annotations__.items() if k != "thresholds"}}
    return wrapped


def threshold_values(thresholds: Thresholds) -> list[float | None]:
    """The six boxes' values (TH_KEYS order) of a Thresholds."""
    return [getattr(thresholds, k) for k in TH_KEYS]


# --------------------------------------------------------------------------- views
def curated_views(store: Store) -> tuple:
    """(count, curated gallery, curated checkboxes, this-sweep checkboxes) of a session."""
    state, records = store.state(), store.records()
    cur = [i for i in state["curated"] if i in records]
    items = [(store.image_path(records[i]), caption(records[i])) for i in cur]
    choices = [(_short(records[i]), i) for i in cur]
    in_sweep = [i for i in state["last_sweep"] if i in set(cur)]
    count = f"**Curated batch: {len(cur)} image(s)** (limit {Limits.from_env().max_curated})"
    return count, items, gr.CheckboxGroup(choices=choices, value=cur), gr.CheckboxGroup(value=in_sweep)


def _short(r: dict) -> str:
    return f"{r['source_class']}→{r['target_class']} s={r['strength']:.2f} seed {r['seed']} ({r['id'][:6]})"


def sweep_grid(store: Store) -> tuple[str | None, G.GridLayout | None, list[dict]]:
    """The last sweep as a labelled grid PNG in the session folder: (path, layout, records)."""
    state, records = store.state(), store.records()
    recs = [records[i] for i in state["last_sweep"] if i in records]
    if not recs:
        return None, None, []
    src_file = store.source_file(recs[0])
    source = load_image(src_file) if src_file is not None and src_file.is_file() else None
    targets = list(dict.fromkeys(r["target_class"] for r in recs))
    title = f"{recs[0]['source_class']} -> " + (targets[0] if len(targets) == 1 else f"{len(targets)} targets")
    bar = recommendation_bar(state.get("summary"))
    several = len({r.get("strategy") for r in recs}) > 1   # one labelled block of columns per strategy
    picture, layout = G.render(recs, lambda r: load_image(store.image_path(r)), source,
                               int(recs[0].get("resolution") or 64), set(state["curated"]), title, bar,
                               block=(lambda r: r.get("strategy", "")) if several else None)
    path = store.root / "grid" / f"sweep-{state['sweeps']}.png"
    save_png(picture, path)
    return str(path), layout, recs


def source_line(record: dict) -> str:
    """Which source a record's image was made from."""
    where = record.get("source_path") or ""
    kind = "upload" if where.startswith(f"{UPLOADS}/") else "example"
    name = Path(where).name if where else "none (text-to-image)"
    return (f"{kind} {md_code(name)} (id {md_code(record.get('source_id'))}), "
            f"class **{md_text(record['source_class'])}**")


def partner_line(records: list[dict]) -> str:
    """diff-ii's second source, and the fast preview, when the sweep had them."""
    rec = next((r for r in records if r.get("partner_path")), None)
    text = ""
    if rec is not None:
        kind = "upload" if rec["partner_path"].startswith(f"{UPLOADS}/") else "example"
        text += (f" · diff-ii partner: {kind} {md_code(Path(rec['partner_path']).name)} "
                 f"(id {md_code(rec['partner_id'])})")
    n = max((r.get("cache_interval", 1) for r in records), default=1)
    return text + (f" · fast preview (feature cache, whole UNet every {n}th step)" if n > 1 else "")


def strategy_lines(records: list[dict], summaries: dict | None, summary: dict | None) -> str:
    """The recommendation, one line per strategy when the sweep compared several."""
    names = list(dict.fromkeys(r.get("strategy") for r in records))
    if len(names) < 2 or not summaries:
        return recommendation(summary)
    return "\n\n".join(f"**{md_text(name)}**: {score_line(summaries.get(name))} — "
                       f"{recommendation(summaries.get(name))}" for name in names)


def score_line(summary: dict | None) -> str:
    """A strategy's mean scores per strength, in one line."""
    parts = []
    for row in (summary or {}).get("strengths", []):
        values = [f"{label} {row[key]:.2f}" for key, label in (("p_target", "P(target)"), ("clip_target", "CLIP"),
                                                             ("distance", "dist")) if row.get(key) is not None]
        parts.append(f"s {row['strength']:g}: " + (", ".join(values) or "no scores"))
    return "; ".join(parts) or "no scores"


def recommendation(summary: dict | None) -> str:
    """One recommended strength, from this sweep, saying plainly whether it passes the bar."""
    if not summary:
        return "no scores for this sweep (see the notes)"
    s, bar = summary.get("recommended_strength"), recommendation_bar(summary)
    rows = {r["strength"]: r for r in summary.get("strengths", [])}
    p = (rows.get(s) or {}).get("p_target")
    if s is None:
        return f"no recommendation: {summary.get('recommendation')}"
    if p is not None and p < bar:
        return (f"**no strength passes** mean P(target) ≥ {bar}; the best was s = {s} "
                f"(mean P(target) {p:.2f}) — try more steps, another target, or a better-trained bundle")
    return f"recommended strength (this sweep): **{s}** — {summary.get('recommendation')}"


def sweep_views(store: Store, figure=None) -> tuple:
    """(grid picture, grid download, sweep checkboxes, table, plot, CSV path, status) of the last sweep."""
    state = store.state()
    path, _, recs = sweep_grid(store)
    box = gr.CheckboxGroup(choices=[(_short(r), r["id"]) for r in recs],
                           value=[r["id"] for r in recs if r["id"] in set(state["curated"])])
    rows = table(recs, set(state["curated"]))
    csv = str(write_csv(store.root / f"sweep-{state['sweeps']}.csv", rows)) if recs else None
    summary = state.get("summary")
    if figure is None and summary:
        figure = plot_sweep(summary)
    status = ""
    if recs:
        status = (f"**sweep {state['sweeps']}** ran: {source_line(recs[0])} → "
                  f"{', '.join(md_text(t) for t in dict.fromkeys(r['target_class'] for r in recs))} · "
                  f"{len(recs)} image(s)" + partner_line(recs) + "\n\n"
                  + strategy_lines(recs, state.get("summaries"), summary))
    return path, path, box, rows, figure, csv, status


def inspect_views(store: Store, record: dict | None, sweep: list[dict] = (), local: bool = True) -> tuple:
    """(image, description, PNG download, command) of one result. The command names the server's
    files for the local user (it runs as it is); a remote visitor gets the public record's names
    (the bundle's folder name, sources relative to it) and ``--out OUT``: no server path."""
    if record is None:
        return None, "", None, ""
    path = store.image_path(record)
    with Image.open(path) as im:   # shown enlarged (crisp pixels); the download is the PNG itself
        side = max(im.size)
        factor = max(1, 256 // side)
        zoom = store.root / "zoom" / f"{record['id']}-x{factor}.png"
        if not zoom.exists():
            zoom.parent.mkdir(parents=True, exist_ok=True)
            im.convert("RGB").resize((im.width * factor, im.height * factor), Image.NEAREST).save(zoom)
    text = (f"**{md_text(record['source_class'])} → {md_text(record['target_class'])}**, "
            f"strength {record['strength']} "
            f"(ran {record['strength_run']:.2f}: {record.get('steps_run')}/{record['num_inference_steps']} steps), "
            f"seed {record['seed']}, guidance {record['guidance_scale']}, {record['strategy']}\n\n"
            f"{caption(record).splitlines()[1]} · soft label "
            + ", ".join(f"{md_text(k)} {v:.2f}" for k, v in record["soft_label"].items())
            + f" · id `{record['id']}` · {'curated' if record['id'] in store.state()['curated'] else 'not curated'}")
    command = (command_for(record, sweep) if local else
               command_for(public_record(record), [public_record(r) for r in sweep], "OUT"))
    return str(zoom), text, path, command


# --------------------------------------------------------------------------- source
def _examples(bundle_path: str) -> list[tuple[str, str]]:
    return bundle_examples(open_bundle_cached(bundle_path))


def _example_class(bundle: Bundle, example: str) -> str | None:
    target = str(Path(example).resolve())
    return next((c for p, c in bundle_examples(bundle) if str(Path(p).resolve()) == target), None)


def source_card(bundle_path: str, upload: str | None, example: str | None, source_class: str,
                guesses: list[tuple[str, float]] | None = None) -> str:
    """What will run, and a flag when the class disagrees with the example's folder; an upload
    without a class asks for one (with the reference classifier's ``guesses`` as a hint)."""
    if upload and not (source_class or "").strip():
        hint = ("the reference classifier's guesses: " + ", ".join(f"{md_text(c)} {p:.2f}" for c, p in guesses)
                if guesses else "no reference classifier to guess from")
        return (f"**Source that will run:** upload {md_code(Path(upload).name)}. ⚠️ **Choose the class of "
                f"{md_text(Path(upload).name)}** in *Source class* before a sweep ({hint}).")
    if upload:
        return (f"**Source that will run:** upload {md_code(Path(upload).name)} as class **{md_text(source_class)}** "
                "(you set the class of an upload)")
    if example:
        folder = _example_class(open_bundle_cached(bundle_path), example)
        line = f"**Source that will run:** example {md_code(Path(example).parent.name + '/' + Path(example).name)}, " \
               f"class **{md_text(source_class)}**"
        if folder and folder != source_class:
            line += (f"\n\n⚠️ the class **{md_text(source_class)}** differs from the example's folder "
                     f"**{md_text(folder)}**: records and soft labels will say {md_text(source_class)}")
        return line
    return "**No source yet:** click an example or upload an image"


def _decode_upload(upload: str) -> Image.Image:
    """An uploaded image, decoded; a refused one (too large, not an image) is deleted from
    Gradio's upload cache at once, so a refused upload leaves nothing behind."""
    try:
        check_upload(upload, Limits.from_env())
        image = load_image(upload)
        _ACCEPTED.add(upload)
        return image
    except (ValueError, FileNotFoundError):
        path = Path(upload).resolve()
        if path.is_relative_to(Path(gr.utils.get_upload_folder()).resolve()):
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()   # Gradio keeps each upload in a folder of its own
        raise


def _source(store: Store, bundle, upload: str | None, example: str | None, source_class: str) -> Source | None:
    """The one source that runs: an upload or a bundle example (never both)."""
    if upload and example:
        raise ValueError("give an uploaded image or an example, not both")
    if upload:
        if not (source_class or "").strip():
            raise ValueError(f"choose the class of the uploaded image {Path(upload).name} (Source class) before a "
                             "sweep: an upload's class is never guessed for you")
        image = _decode_upload(upload)
        return Source(image, source_class, Path(upload).stem, store.save_source(image, Path(upload).name))
    if example:
        allowed = {str(Path(p).resolve()) for p, _ in bundle_examples(bundle)}
        if str(Path(example).resolve()) not in allowed:
            raise ValueError(f"{example} is not one of the bundle's example images")
        return Source(load_image(example), source_class, Path(example).stem, example)
    return None


def _partner(store: Store, bundle, partner: str | None, partner_upload: str | None,
             source_class: str) -> Source | None:
    """diff-ii's second source when the user chose one: an example of the source's class or an
    upload (filed under the source's class); None = drawn from the class's examples."""
    if partner and partner_upload:
        raise ValueError("give a partner example or a partner upload, not both")
    if partner_upload:
        image = _decode_upload(partner_upload)
        return Source(image, source_class, Path(partner_upload).stem,
                      store.save_source(image, Path(partner_upload).name))
    if partner:
        folder = _example_class(bundle, partner)
        if folder is None:
            raise ValueError(f"{partner} is not one of the bundle's example images")
        if folder != source_class:
            raise ValueError(f"the diff-ii partner {Path(partner).name} is an example of {folder!r}, the source a "
                             f"{source_class!r}: pick an example of the source's class")
        return Source(load_image(partner), source_class, Path(partner).stem, partner)
    return None


def strategy_choices(bundle) -> tuple[list[str], str]:
    """The strategies ``bundle`` can run (translate.strategy_unavailable: the engine's own rule), and
    a line naming those left out, with the reason."""
    reasons = {name: strategy_unavailable(name, bundle) for name in STRATEGIES}
    offered = [name for name, why in reasons.items() if not why]
    left = {name: why for name, why in reasons.items() if why}
    info = "several are compared side by side, one block of grid columns each"
    if left:
        info += f". Not offered for this bundle: {', '.join(left)} ({next(iter(left.values()))})"
    return offered, info


def partner_choices(bundle_path: str, source_class: str) -> list[tuple[str, str]]:
    """The diff-ii partner dropdown: auto, then the bundle's examples of ``source_class``."""
    examples = [(f"{Path(p).parent.name}/{Path(p).name}", p) for p, c in _examples(bundle_path) if c == source_class]
    return [("auto: drawn from the class's examples (seeded)", "")] + examples


def on_partner_view(bundle_path: str, upload: str | None, example: str | None, source_class: str, seeds: str,
                    partner: str | None, partner_upload: str | None):
    """The partner dropdown (examples of the source's class) and the partner diff-ii will run with
    (auto: drawn with the first seed, as the sweep draws it), shown next to the source."""
    choices = partner_choices(bundle_path, source_class)
    if partner not in {v for _, v in choices}:
        partner = ""
    try:   # nothing is saved: the sweep stores the sources it runs
        bundle = open_bundle_cached(bundle_path)
        source = (Source(_decode_upload(upload), source_class, Path(upload).stem) if upload else
                  _source(None, bundle, None, example, source_class))
        chosen = (Source(_decode_upload(partner_upload), source_class, Path(partner_upload).stem) if partner_upload
                  else _partner(None, bundle, partner, None, source_class))
        seed = (parse_seeds(seeds) or [0])[0]
        second = pick_partner(bundle, source, seed, chosen) if source is not None else None
    except (ValueError, FileNotFoundError):
        second = None
    image = second.image if second is not None else None
    label = ("diff-ii partner: none yet" if second is None else
             "diff-ii partner: the source itself (no other example of its class)"
             if second.pixel_hash() == source.pixel_hash() else f"diff-ii partner: {second.id}")
    return gr.Dropdown(choices=choices, value=partner), gr.Image(value=image, label=label)


# --------------------------------------------------------------------------- handlers
def _visitor(request: gr.Request | None) -> tuple[str | None, dict]:
    """(client host, headers) of a request."""
    client = getattr(getattr(request, "client", None), "host", None) if request is not None else None
    headers = dict(request.headers) if request is not None and getattr(request, "headers", None) else {}
    return client, headers


def _save_state(request: gr.Request | None) -> tuple[bool, str]:
    return saving_allowed(*_visitor(request))


@_errors
def bundle_info(path: str, request: gr.Request | None = None) -> str:
    return _bundle_panel(open_bundle_cached(path), request)


def _bundle_panel(bundle, request: gr.Request | None, profile=None, examples: int | None = None) -> str:
    _, ref_status = reference_for(bundle)
    info = bundle_markdown(bundle, clip_line(clip_scorer(bundle)), ref_status, profile, examples)
    allowed, why = _save_state(request)
    return info + ("" if allowed else f"\n\nprofile saving: off ({why})")


# What choosing a bundle refreshes, in order: on_bundle's values and _bundle_outputs' components
# (``th`` stands for the six threshold boxes, TH_KEYS).
BUNDLE_OUTPUTS = ("info", "examples", "source_class", "target", "tune", "th", "strategy", "steps", "guidance",
                  "example", "upload", "preview", "card", "profile_btn")


@_errors
def on_bundle(path: str, request: gr.Request = None):
    """Bundle panel, example gallery, class dropdowns, the profile's strength / thresholds; the
    source is cleared (a new bundle has its own examples)."""
    bundle = open_bundle_cached(path)
    classes = list(bundle.classes)
    profile = load_profile(bundle)
    examples = bundle_examples(bundle)   # one load and one scan per bundle change
    strength = profile.start_strength(bundle)
    defaults = TranslateConfig()
    allowed, _ = _save_state(request)
    values = {"info": _bundle_panel(bundle, request, profile, len(examples)), "examples": examples,
              "source_class": gr.Dropdown(choices=classes, value=classes[0]),
              "target": gr.Dropdown(choices=[ALL_OTHER] + classes, value=classes[min(1, len(classes) - 1)]),
              "tune": strength, "th": threshold_values(profile.thresholds),
              "strategy": _strategy_dropdown(bundle, profile.strategy),
              "steps": profile.num_inference_steps or defaults.num_inference_steps,
              "guidance": defaults.guidance_scale if profile.guidance_scale is None else profile.guidance_scale,
              "example": "", "upload": None, "preview": None, "card": source_card(path, None, None, classes[0]),
              "profile_btn": gr.Button(interactive=allowed)}
    return tuple(v for name in BUNDLE_OUTPUTS for v in (values[name] if name == "th" else [values[name]]))


def _strategy_dropdown(bundle, preferred: str | None) -> gr.Dropdown:
    """The strategies this bundle can run, the profile's chosen (else diff-mix); the others named with why."""
    offered, info = strategy_choices(bundle)
    value = preferred if preferred in offered else "diff-mix" if "diff-mix" in offered else offered[0]
    return gr.Dropdown(choices=offered, value=[value], info=info, multiselect=True)


@_errors
def on_bundle_text(text: str):
    """Add a bundle folder or Hub repo id to the dropdown and select it."""
    path = str(open_typed_bundle(text).path)   # a bundle root's folder or a Hub id, nothing else
    choices = [(k, v) for k, v in app_bundles().items() if v != path]
    return gr.Dropdown(choices=choices + [(f"{text.strip()} ({path})", path)], value=path)


@_errors
def on_example(path: str, evt: gr.SelectData):
    """An example becomes THE source: its class is set, any upload is cleared."""
    image, cls = _examples(path)[evt.index]
    return image, cls, load_image(image), None, source_card(path, None, image, cls)


@_errors
def on_upload(path: str, upload: str | None, source_class: str):
    """An upload becomes THE source: the example is cleared, and so is the class: the user
    chooses it (the reference classifier's top guesses shown as a hint). A cleared upload
    leaves the class as it is."""
    if not upload:
        return None, "", source_card(path, None, None, source_class), gr.skip()
    image = _decode_upload(upload)
    guesses = class_guesses(open_bundle_cached(path), image)
    return image, "", source_card(path, upload, None, "", guesses), gr.Dropdown(value=None)


def on_source_change(path: str, upload: str | None, example: str | None, source_class: str):
    try:
        guard.check_call(on_source_change, (path, upload, example, source_class))
        return source_card(path, upload, example, source_class)
    except (ValueError, FileNotFoundError) as err:
        return f"⚠️ {err}"


def _sweep_request(bundle_path: str, upload: str | None, example: str | None, source_class: str, target: str,
                   strengths: str, seeds: str, steps: float, guidance: float, strategy: str | list[str],
                   fast: bool, partner: str | None, partner_upload: str | None, inversion_steps: float, token: str):
    """The sweep inputs (the /sweep API's parameters, in order) read once: (store, bundle loaded
    once for the request, the source that runs, the SweepRequest, diff-ii's partner when the user
    chose one)."""
    store = open_store(token)
    bundle = open_bundle_cached(bundle_path)
    source = _source(store, bundle, upload, example, source_class)
    request = SweepRequest(source_class, target, strengths, seeds, int(steps), float(guidance), strategy,
                           FAST_PREVIEW if fast else 1, int(inversion_steps or DiffIIConfig.inversion_steps))
    return store, bundle, source, request, _partner(store, bundle, partner, partner_upload, source_class)


def check_sweep(bundle_path: str, upload: str | None, example: str | None, source_class: str, target: str,
                strengths: str, seeds: str, steps: float, guidance: float, strategy: str | list[str],
                fast: bool, partner: str | None, partner_upload: str | None, inversion_steps: float,
                token: str) -> None:
    """Everything a sweep needs, checked before anything runs: a mistake is a message, and the
    previous grid, plot, table and curated batch stay as they were."""
    try:
        guard.check_call(check_sweep, (bundle_path, upload, example, source_class, target, strengths, seeds, steps,
                                       guidance, strategy, fast, partner, partner_upload, inversion_steps, token))
        _, bundle, source, request, second = _sweep_request(
            bundle_path, upload, example, source_class, target, strengths, seeds, steps, guidance, strategy,
            fast, partner, partner_upload, inversion_steps, token)
        plan_sweep(bundle, source, request, Limits.from_env(), second)
    except (ValueError, FileNotFoundError) as err:
        raise _user_error(err, "sweep") from None


def _progress_callback(progress: gr.Progress, n_images: int, clock: Callable[[], float] = time.monotonic):
    """``callback(steps done, total)`` for the engine: the steps, the seconds, and the time left
    from the measured time per step; "estimating…" until a step has been timed (the first one
    also carries loading and warm-up, so the estimate starts from the steps after it)."""
    start = clock()
    first: list[tuple[int, float]] = []   # (steps done, time) at the first report

    def report(done: int, total: int) -> None:
        now = clock()
        if not first:
            first.append((done, now))
        base_done, base_time = first[0]
        if done > base_done:
            left = f"about {(now - base_time) / (done - base_done) * (total - done):.0f} s left"
        else:
            left = "estimating…"
        progress((done, total), unit="steps",
                 desc=f"{n_images} image(s): step {done}/{total}, {now - start:.0f} s, {left}")
    return report


@_errors
def on_sweep(bundle_path: str, upload: str | None, example: str | None, source_class: str, target: str,
             strengths: str, seeds: str, steps: float, guidance: float, strategy: str | list[str],
             fast: bool = False, partner: str | None = None, partner_upload: str | None = None,
             inversion_steps: float = DiffIIConfig.inversion_steps, token: str = "", progress=gr.Progress()):
    """One sweep through the engine; rows = strength, columns = seed (or target); several
    strategies (a list, or comma-separated) side by side, one block of columns each."""
    store, bundle, source, request, second = _sweep_request(
        bundle_path, upload, example, source_class, target, strengths, seeds, steps, guidance, strategy,
        fast, partner, partner_upload, inversion_steps, token)
    limits = Limits.from_env()
    plan = plan_sweep(bundle, source, request, limits, second)
    progress(0, desc=f"{len(plan.jobs)} image(s): loading the model, estimating…")
    out = run_sweep(store, bundle, source, request, limits=limits, generate_fn=_generate, plan=plan,
                    callback=_progress_callback(progress, len(plan.jobs)))
    picture, download, box, rows, fig, csv, status = sweep_views(store, out.figure)
    flag = ""
    if example and not upload:
        folder = _example_class(bundle, example)
        if folder and folder != source_class:
            flag = (f"\n\n⚠️ ran as class **{md_text(source_class)}** although the example's folder is "
                    f"**{md_text(folder)}**")
    notes = [n for n in out.notes if n and n not in status and not n.startswith("CLIP")]   # CLIP: bundle panel
    status += flag + ("\n\n" + " · ".join(notes) if notes else "")
    rec = (out.summary or {}).get("recommended_strength")
    return (store.token, picture, download, box, rows, fig, csv, status, rec, *curated_views(store)[:3])


@_errors
def on_select(token: str, ids: str, mode: str):
    """API: change the curated batch by ids (comma-separated); mode add / remove / toggle / set."""
    store = open_store(token)
    update_curated(store, [i for i in ids.replace(",", " ").split() if i], mode or "add", Limits.from_env())
    return (store.token, *curated_views(store))


@_errors
def on_grid_click(token: str, mode: str, evt: gr.SelectData, request: gr.Request = None):
    """A click on a tile shows it below and, in curate mode, toggles it in the curated batch."""
    store = open_store(token)
    _, layout, recs = sweep_grid(store)
    hit = G.cell_at(layout, *evt.index[:2]) if layout is not None and evt.index else None
    rid = layout.cells[hit[0]][hit[1]] if hit else None
    if rid is None:   # between tiles, on a label or on the source
        return (store.token, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), *curated_views(store))
    if mode != "inspect":
        update_curated(store, [rid], "toggle", Limits.from_env())
    path, _, _ = sweep_grid(store)
    record = next(r for r in recs if r["id"] == rid)
    return (store.token, path, *inspect_views(store, record, recs, local_visitor(*_visitor(request))),
            *curated_views(store))


@_errors
def on_sweep_box(token: str, ids: list[str]):
    store = open_store(token)
    update_curated(store, ids or [], "set", Limits.from_env())
    return (store.token, sweep_grid(store)[0], *curated_views(store))


@_errors
def on_curated_box(token: str, ids: list[str]):
    store = open_store(token)
    removed = [i for i in store.state()["curated"] if i not in set(ids or [])]
    update_curated(store, removed, "remove")
    return (store.token, sweep_grid(store)[0], *curated_views(store))


@_errors
@takes_thresholds
def on_auto(token: str, thresholds: Thresholds):
    """Add every image of the last sweep that meets the thresholds (empty = off)."""
    store = open_store(token)
    records = store.records()
    recs = [records[i] for i in store.state()["last_sweep"] if i in records]
    ids, notes = passing(recs, thresholds)
    update_curated(store, ids, "add", Limits.from_env())
    msg = f"auto-selected {len(ids)} of {len(recs)} image(s) of the last sweep" + "".join(f"\n\n{n}" for n in notes)
    return (store.token, msg, sweep_grid(store)[0], *curated_views(store))


@_errors
@takes_thresholds
def on_save_profile(bundle_path: str, strength: float, strategy: str | list[str], steps: float, guidance: float,
                    thresholds: Thresholds, request: gr.Request = None):
    """Save the chosen strength, thresholds and sampler settings as this bundle's user profile
    (under the output root; the bundle's own files are never written)."""
    allowed, why = _save_state(request)
    if not allowed:
        raise ValueError(why)
    bundle = open_bundle_cached(bundle_path)
    path = save_profile(bundle, strength, thresholds, {
        "strategy": parse_strategies(strategy)[0], "num_inference_steps": int(steps),
        "guidance_scale": float(guidance)})
    shown = path.relative_to(output_root()).as_posix()   # the visitor sees no server path
    return (f"saved to `{shown}` under the output root: strength {strength}, "
            f"thresholds {clean_thresholds(thresholds) or 'none'} "
            f"(the bundle itself is unchanged; `diffmix translate` / `synthesize` start from it)")


@_errors
def on_export(token: str):
    """Export the curated batch (imagefolder + meta.csv + manifest + zip) into a new folder."""
    store = open_store(token)
    folder, zip_path = export_curated(store)
    served = store.root / "downloads" / zip_path.name   # served from the session folder (temp dir)
    served.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(zip_path, served)
    except OSError:
        shutil.copyfile(zip_path, served)
    n = len(store.state()["curated"])
    shown = folder.relative_to(output_root()).as_posix()   # the visitor sees no server path
    message = f"exported {n} image(s) to `{shown}` under the output root (and `{zip_path.name}`)"
    with store.lock:   # a reload shows this export, ready to download
        state = store.state()
        state["export"] = {"message": message, "folder": shown, "zip": str(served)}
        store.save_state(state)
    return store.token, message, shown, str(served)


@_errors
def on_clear(token: str):
    store = open_store(token)
    update_curated(store, store.state()["curated"], "remove")
    return (store.token, sweep_grid(store)[0], *curated_views(store))


@_errors
def on_session(saved: str, token: str):
    """Page (re)load, first step: the session of the browser's token (else a new one), and the
    bundle of its last sweep chosen (on_bundle then fills the form for it; :func:`on_restore` last)."""
    store = open_store(token or saved)
    state = store.state()
    path = state.get("bundle") if state["last_sweep"] else None
    if not path or not Path(path).is_dir():
        return store.token, store.token, gr.skip()
    choices = [(k, v) for k, v in app_bundles().items()]
    if path not in {v for _, v in choices}:   # a bundle loaded by folder or repo id
        choices.append((path, path))
    return store.token, store.token, gr.Dropdown(choices=choices, value=path)


# What a page (re)load restores after on_session and on_bundle, in order (on_restore's values).
RESTORE_OUTPUTS = ("grid", "grid_dl", "sweep_box", "table", "plot", "csv", "status", "count", "cur_gallery",
                   "cur_box", "example", "upload", "preview", "source_class", "target", "strengths", "seeds", "steps",
                   "guidance", "strategy", "fast", "inversion_steps", "card", "tune", "export_msg", "export_dir",
                   "export_zip")


@_errors
def on_restore(token: str, bundle_path: str):
    """Page (re)load, last step: one consistent page from the session on disk: the last sweep's
    grid, table, plot and status; its source, classes and settings in the form; the curated
    batch; the last export, ready to download. Without a sweep the form stays the bundle's."""
    store = open_store(token)
    state = store.state()
    values = dict.fromkeys(RESTORE_OUTPUTS, gr.skip())
    if state["last_sweep"]:
        values.update(zip(RESTORE_OUTPUTS[:7], sweep_views(store)))
        values.update(_restored_form(store, bundle_path))
    values.update(zip(("count", "cur_gallery", "cur_box"), curated_views(store)[:3]))
    export = state.get("export") or {}
    if export and Path(export["zip"]).is_file():
        values.update(export_msg=export["message"], export_dir=export["folder"], export_zip=export["zip"])
    return tuple(values[name] for name in RESTORE_OUTPUTS)


def _restored_form(store: Store, bundle_path: str) -> dict:
    """The form as the last sweep had it: its source (the example, or the upload offered again
    under its own name so a new sweep gives the same records), classes and settings."""
    state, records = store.state(), store.records()
    first = records.get(state["last_sweep"][0])
    request = state.get("request")
    if first is None or request is None or state.get("bundle") != bundle_path:
        return {}
    form = {"source_class": request["source_class"], "target": request["target"], "strengths": request["strengths"],
            "seeds": request["seeds"], "steps": request["steps"], "guidance": request["guidance"],
            "strategy": list(request.get("strategies") or [request.get("strategy", "diff-mix")]),
            "fast": request.get("cache_interval", 1) != 1, "inversion_steps": request.get("inversion_steps", gr.skip()),
            "tune": (state.get("summary") or {}).get("recommended_strength")}
    source = store.source_file(first)
    upload = example = None
    if source is not None and source.is_file():
        if first["source_path"].startswith(f"{UPLOADS}/"):
            stem = first["source_id"]   # the upload's own name: a sweep of it gives the same source id
            stem = stem if re.fullmatch(r"[\w\- ][\w.\- ]*", stem or "") else safe_name(stem or "upload")
            upload = store.root / "restore" / source.stem / f"{stem}.png"
            if not upload.is_file():
                upload.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, upload)
            upload = str(upload)
        else:
            example = str(source)
        form.update(preview=load_image(source))
    form.update(example=example or "", upload=upload,
                card=source_card(bundle_path, upload, example, request["source_class"]))
    return form


# --------------------------------------------------------------------------- layout
INTRO = ("# diffmix — Diff-Mix inter-class translation\n"
         "Pick an adapter bundle and a source image, sweep the translation strength (rows) over seeds "
         "(columns), judge the scores, click tiles to curate them, export the batch.")

LEGEND = """\
- **P(target)** / **P(source)**: the bundle's reference classifier's probability that the image shows the
  target / the source class (badge on each tile: green at or above the bar, red below).
- **CLIP(target)**: CLIP similarity of the image to the target's prompt (when CLIP weights are available).
- **distance**: 1 − cosine similarity of the image's and the source's embeddings: 0 = the same picture,
  1 = unrelated, at most 2 (embeddings pointing opposite ways), so a value a little over 1 is possible.
- **SSIM**: structural similarity to the source (1 = a copy). **Vendi**: how varied the seeds of one strength
  are (1 = all alike, up to the number of seeds); it needs at least 2 seeds, so a one-seed sweep has none.
- **ran**: the strength that actually ran, ⌊N·s⌋/N of the N scheduler steps (shown as *steps* on each row).
- **Plot**, left: faithfulness (black: all targets; thin: each target; dashed grey: P(source)); the red dotted line
  is the bar mean P(target) must reach; the green dash-dot line the recommended strength. Right: diversity
  (distance, 1 − SSIM, Vendi).
"""


def wait_until_served(url: str, proc: subprocess.Popen, timeout: float = 300, log: Path | None = None) -> None:
    """Wait until the app started as ``proc`` (``python app.py``) answers ``url`` with 200; raise
    RuntimeError, with the end of ``log`` when given, if it exits or is still silent after ``timeout`` s.
    Used by the benchmarks and the tests that start the app in a fresh process."""
    tail = lambda: f":\n{log.read_text(errors='replace')[-3000:]}" if log else ""   # noqa: E731
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode} before serving{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"app.py did not serve {url} within {timeout:g} s{tail()}")


class _Blocks(gr.Blocks):
    """gr.Blocks whose launch() bounds uploads at the HTTP layer by default (an upload over
    DIFFMIX_MAX_UPLOAD_MB is refused by Gradio's upload route, before any handler or disk sees
    it) and lets Gradio serve the offered bundles' example images wherever their folder is."""

    example_files: list[str] = []   # the offered bundles' example images (build_demo sets them)

    def launch(self, *args, **kwargs):
        kwargs.setdefault("max_file_size", f"{Limits.from_env().max_upload_mb}mb")
        # bundle folders may lie outside the working and temp dirs (DIFFMIX_BUNDLES=/srv/bundles):
        # Gradio may serve their example images, each file by name (nothing else of a bundle)
        kwargs["allowed_paths"] = [*(kwargs.get("allowed_paths") or []), *self.example_files]
        return super().launch(*args, **kwargs)


def broken_markdown(broken: dict[str, str]) -> str:
    """The bundles that could not be loaded, each with its reason."""
    if not broken:
        return ""
    return "⚠️ **Bundles left out** (they did not load):\n\n" + "\n".join(
        f"- {md_code(folder)}: {md_text(reason[:300])}" for folder, reason in broken.items())


# --------------------------------------------------------------------------- the page: layout, then wiring
def build_demo() -> gr.Blocks:
    """The app: the page's components (:func:`_layout`), then their events (:func:`_wire`)."""
    broken: dict[str, str] = {}
    bundles = app_bundles(broken)
    first = next(iter(bundles.values()))
    bundle = open_bundle_cached(first)
    clip_scorer(bundle)   # start loading its CLIP in the background now, not on the first sweep
    classes = list(bundle.classes)
    limits = Limits.from_env()
    # Gradio's own upload cache follows the session policy (uploads of expired sessions go too).
    with _Blocks(title="diffmix", delete_cache=(3600, limits.session_ttl_h * 3600)) as demo:
        ui = _layout(bundles, first, classes, limits, broken)
        _wire(demo, ui)
    guard_events(demo)
    _UPLOAD_SETS.append(demo.upload_file_set)
    demo.example_files = [p for folder in bundles.values() for p, _ in _examples(folder)]
    demo.queue(max_size=limits.queue_size)
    return demo


def _layout(bundles: dict[str, str], first: str, classes: list[str], limits: Limits,
            broken: dict[str, str]) -> SimpleNamespace:
    """Every component of the page, top to bottom, by name; no events (:func:`_wire`)."""
    ui = SimpleNamespace()
    ui.token = gr.State("")
    ui.saved_token = gr.BrowserState("", storage_key="diffmix-session")
    gr.Markdown(INTRO)
    gr.Markdown(broken_markdown(broken), elem_id="broken-bundles", visible=bool(broken))
    with gr.Row():
        ui.bundle = gr.Dropdown(choices=[(k, v) for k, v in bundles.items()], value=first, label="Adapter bundle",
                                scale=3)
        ui.bundle_text = gr.Textbox(label="…or a bundle folder / Hub repo id", placeholder="owner/name", scale=2)
        ui.load_btn = gr.Button("Load bundle", scale=1)
    ui.info = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            _source_panel(ui, classes, limits)
        with gr.Column(scale=2):
            _results_panel(ui)
    with gr.Row():
        _curation_panel(ui)
    _calibrate_panel(ui, limits)
    # API-only inputs for /select (scripts choose ids; people click) and the button behind /bundle_info
    ui.sel_ids = gr.Textbox(visible=False)
    ui.sel_mode = gr.Textbox(value="add", visible=False)
    ui.sel_btn = gr.Button(visible=False)
    ui.bundle_info_btn = gr.Button(visible=False)
    return ui


def _source_panel(ui: SimpleNamespace, classes: list[str], limits: Limits) -> None:
    """The left column: the source image, the classes and the sweep's settings."""
    ui.examples = gr.Gallery(label="Example sources (click one)", columns=6, height=180, format="png",
                             allow_preview=False, elem_id="examples")
    ui.upload = gr.File(label=f"…or upload a source image (≤ {limits.max_upload_mb} MB)",
                        file_types=["image"], type="filepath", height=90, elem_id="upload")
    ui.example = gr.Textbox(label="Example chosen", interactive=False)
    ui.preview = gr.Image(label="Source as decoded", interactive=False, format="png", height=128)
    # Choices follow the bundle; the library validates names, so API callers may type any bundle's.
    ui.source_class = gr.Dropdown(classes, value=classes[0], label="Source class", filterable=True,
                                  allow_custom_value=True)
    ui.target = gr.Dropdown([ALL_OTHER] + classes, value=classes[1], label="Target class",
                            filterable=True, allow_custom_value=True,
                            info="one class, all other classes, or several typed with commas (duck, owl)")
    _strategy_panel(ui)
    ui.strengths = gr.Textbox(value="0.3, 0.5, 0.7, 0.9", label="Strengths",
                              info="a list (0.3, 0.5, 0.7) or a range from:to:count (0.1:0.9:5)")
    ui.seeds = gr.Textbox(value="0, 1", label="Seeds",
                          info="a list (0, 1, 7), a count (n=4), or -1 for a random seed (recorded)")
    ui.steps = gr.Slider(1, 100, value=TranslateConfig.num_inference_steps, step=1, label="Steps")
    ui.guidance = gr.Slider(0, 20, value=TranslateConfig.guidance_scale, step=0.5, label="Guidance")
    ui.run = gr.Button("Run sweep", variant="primary")


def _strategy_panel(ui: SimpleNamespace) -> None:
    """Strategies (several: side by side), diff-ii's partner and the fast preview switch."""
    # Choices follow the bundle (on_bundle: only what it can run); a list, or comma-separated over the API.
    ui.strategy = gr.Dropdown(choices=list(STRATEGIES), value=["diff-mix"], label="Strategies", multiselect=True,
                              allow_custom_value=True, info="several are compared side by side")
    with gr.Accordion("diff-ii: the second source of the class", open=False):
        with gr.Row():
            ui.partner = gr.Dropdown([("auto: drawn from the class's examples (seeded)", "")], value="",
                                     label="Partner", allow_custom_value=True, scale=2)
            ui.partner_preview = gr.Image(label="diff-ii partner", interactive=False, format="png", height=128,
                                          scale=1, elem_id="partner")
        ui.partner_upload = gr.File(label="…or upload the partner (same class)", file_types=["image"],
                                    type="filepath", height=90)
        ui.inversion_steps = gr.Slider(1, 1000, value=DiffIIConfig.inversion_steps, step=1, label="Inversion steps",
                                       info="DDIM inversion of each source (Diff-II: 200); cached across sweeps")
    ui.fast = gr.Checkbox(value=False, label=f"Fast preview (feature cache: the whole UNet every {FAST_PREVIEW}rd "
                          "step; recorded)")


def _results_panel(ui: SimpleNamespace) -> None:
    """The right column: the sweep grid, the chosen tile, the scores and the plot."""
    ui.card = gr.Markdown(elem_id="source-card")
    ui.status = gr.Markdown(elem_id="status")
    gr.Markdown("**Sweep grid**: rows = strength (and the steps that ran), columns = seed (or target), one "
                "labelled block of columns per strategy; "
                "the source first; P(target) on each tile; green frame = curated. Click a tile.")
    ui.grid = gr.Image(label="Sweep grid", interactive=False, format="png", elem_id="grid",
                       show_label=False, buttons=["fullscreen"])
    with gr.Row():
        ui.click_mode = gr.Radio(["curate", "inspect"], value="curate", label="A click on a tile",
                                 info="curate: toggles it in the batch and shows it below; inspect: "
                                 "only shows it", scale=2)
        ui.grid_dl = gr.DownloadButton("Download grid (PNG)", scale=1)
    with gr.Row():
        ui.one_image = gr.Image(label="Tile (full resolution)", interactive=False, format="png",
                                height=256, elem_id="tile", buttons=["fullscreen"])
        with gr.Column():
            ui.one_text = gr.Markdown(elem_id="tile-info")
            ui.one_dl = gr.DownloadButton("Download this image (PNG with its record)")
    ui.one_cmd = gr.Code(label="Copy as command: makes this sweep again, this image with the same pixels",
                         language="shell", elem_id="tile-command", interactive=False)
    ui.sweep_box = gr.CheckboxGroup(label="Curate from this sweep")
    with gr.Accordion("What the scores and the plot mean", open=False):
        gr.Markdown(LEGEND)
    gr.Markdown("**Faithfulness / diversity vs strength**")   # above the plot: a block label would cover its titles
    ui.plot = gr.Plot(label="Faithfulness / diversity vs strength", show_label=False, elem_id="plot")
    ui.table = gr.Dataframe(headers=list(TABLE_COLUMNS), label="Scores and records", max_height=300)
    ui.csv = gr.DownloadButton("Download table (CSV)")


def _curation_panel(ui: SimpleNamespace) -> None:
    """Below: thresholds and the profile (left), the curated batch and its export (right)."""
    with gr.Column():
        gr.Markdown("### Thresholds and per-dataset profile")
        with gr.Row():
            ui.th = [gr.Number(label=label, value=None) for label in TH_LABELS]
        with gr.Row():
            ui.auto_btn = gr.Button("Auto-select last sweep by thresholds")
            ui.tune = gr.Number(label="Chosen strength", minimum=0, maximum=1)
            ui.profile_btn = gr.Button("Save strength + thresholds as my profile")
        ui.auto_msg = gr.Markdown()
        ui.profile_msg = gr.Markdown()
    with gr.Column():
        ui.count = gr.Markdown("**Curated batch: 0 image(s)**")
        ui.cur_gallery = gr.Gallery(label="Curated batch", columns=8, height=160, format="png",
                                    allow_preview=True, object_fit="contain", elem_id="curated")
        ui.cur_box = gr.CheckboxGroup(label="Curated (uncheck to remove)")
        with gr.Row():
            ui.clear_btn = gr.Button("Clear batch")
            ui.export_btn = gr.Button("Export batch", variant="primary")
        ui.export_msg = gr.Markdown()
        ui.export_dir = gr.Textbox(label="Export folder", interactive=False)
        ui.export_zip = gr.DownloadButton("Download export (zip)")


PRIVATE = {"api_visibility": "private"}   # an event for the page only, not an API endpoint


def _wire(demo: gr.Blocks, ui: SimpleNamespace) -> None:
    """Connect the events, in the order Gradio lists them: page load and bundle, source,
    sweep and grid, curation and export. Named endpoints (api_name) are the app's API."""
    _wire_bundle(demo, ui)
    _wire_sweep(ui)
    _wire_curation(ui)
    _wire_calibrate(demo, ui)


def _bundle_outputs(ui: SimpleNamespace) -> list:
    """What choosing a bundle refreshes (on_bundle's outputs, in BUNDLE_OUTPUTS' order)."""
    return [c for name in BUNDLE_OUTPUTS for c in (ui.th if name == "th" else [getattr(ui, name)])]


def _curated(ui: SimpleNamespace) -> list:
    """The curated batch's views (curated_views' outputs, in order)."""
    return [ui.count, ui.cur_gallery, ui.cur_box, ui.sweep_box]


def _wire_bundle(demo: gr.Blocks, ui: SimpleNamespace) -> None:
    """Page load (session restore, first bundle), bundle choice, and the source image."""
    bundle_outputs = _bundle_outputs(ui)
    source_inputs = [ui.bundle, ui.upload, ui.example, ui.source_class]
    # a (re)load: the session and its bundle, that bundle's form, then the session's last sweep and export
    demo.load(on_session, [ui.saved_token, ui.token], [ui.token, ui.saved_token, ui.bundle], **PRIVATE).then(
        on_bundle, ui.bundle, bundle_outputs, **PRIVATE).then(
        on_restore, [ui.token, ui.bundle], [getattr(ui, name) for name in RESTORE_OUTPUTS], **PRIVATE)
    ui.bundle.input(on_bundle, ui.bundle, bundle_outputs, **PRIVATE)
    # /bundle_info for scripts: the same panel, from any bundle folder
    ui.bundle_info_btn.click(on_bundle, ui.bundle, bundle_outputs, api_name="bundle_info")
    ui.load_btn.click(on_bundle_text, ui.bundle_text, ui.bundle, **PRIVATE).success(
        on_bundle, ui.bundle, bundle_outputs, **PRIVATE)
    ui.examples.select(on_example, ui.bundle, [ui.example, ui.source_class, ui.preview, ui.upload, ui.card],
                       **PRIVATE)
    upload_outputs = [ui.preview, ui.example, ui.card, ui.source_class]
    ui.upload.upload(on_upload, [ui.bundle, ui.upload, ui.source_class], upload_outputs, **PRIVATE)
    ui.upload.clear(on_upload, [ui.bundle, ui.upload, ui.source_class], upload_outputs, **PRIVATE)
    ui.source_class.input(on_source_change, source_inputs, ui.card, **PRIVATE)
    _wire_partner(ui)


def _wire_partner(ui: SimpleNamespace) -> None:
    """diff-ii's partner follows the source, its class and the first seed."""
    inputs = [ui.bundle, ui.upload, ui.example, ui.source_class, ui.seeds, ui.partner, ui.partner_upload]
    for event in (ui.example.change, ui.upload.change, ui.source_class.change, ui.seeds.blur, ui.partner.input,
                  ui.partner_upload.change):
        event(on_partner_view, inputs, [ui.partner, ui.partner_preview], **PRIVATE)


def _wire_sweep(ui: SimpleNamespace) -> None:
    """Run a sweep (/sweep), click tiles, tick boxes, select by id (/select)."""
    curated = _curated(ui)
    sweep_inputs = [ui.bundle, ui.upload, ui.example, ui.source_class, ui.target, ui.strengths, ui.seeds, ui.steps,
                    ui.guidance, ui.strategy, ui.fast, ui.partner, ui.partner_upload, ui.inversion_steps, ui.token]
    ui.run.click(check_sweep, sweep_inputs, None, **PRIVATE).success(
        on_sweep, sweep_inputs,
        [ui.token, ui.grid, ui.grid_dl, ui.sweep_box, ui.table, ui.plot, ui.csv, ui.status, ui.tune, ui.count,
         ui.cur_gallery, ui.cur_box],
        api_name="sweep", concurrency_limit=1, concurrency_id="gpu")
    ui.grid.select(on_grid_click, [ui.token, ui.click_mode],
                   [ui.token, ui.grid, ui.one_image, ui.one_text, ui.one_dl, ui.one_cmd, *curated],
                   trigger_mode="multiple", **PRIVATE)   # every click counts, in order
    ui.sweep_box.input(on_sweep_box, [ui.token, ui.sweep_box], [ui.token, ui.grid, *curated], **PRIVATE)
    ui.cur_box.input(on_curated_box, [ui.token, ui.cur_box], [ui.token, ui.grid, *curated], **PRIVATE)
    ui.sel_btn.click(on_select, [ui.token, ui.sel_ids, ui.sel_mode], [ui.token, *curated], api_name="select")


def _wire_curation(ui: SimpleNamespace) -> None:
    """Thresholds (/auto_select), the batch (/clear), the profile (/save_profile), the export (/export)."""
    curated = _curated(ui)
    ui.auto_btn.click(on_auto, [ui.token, *ui.th], [ui.token, ui.auto_msg, ui.grid, *curated], api_name="auto_select")
    ui.clear_btn.click(on_clear, ui.token, [ui.token, ui.grid, *curated], api_name="clear")
    ui.profile_btn.click(on_save_profile, [ui.bundle, ui.tune, ui.strategy, ui.steps, ui.guidance, *ui.th],
                         ui.profile_msg, api_name="save_profile").success(bundle_info, ui.bundle, ui.info, **PRIVATE)
    ui.export_btn.click(on_export, ui.token, [ui.token, ui.export_msg, ui.export_dir, ui.export_zip],
                        api_name="export")


# --------------------------------------------------------------------------- calibrate: the dataset's strength
CALIBRATE_INTRO = (
    "### Calibrate: the dataset's strength from many sources\n"
    "A sweep shows how *one* image behaves. Calibration draws K sources per class, sends each to M other "
    "classes at every strength and seed in one engine run, and recommends the dataset's strength with a "
    "95 % interval (a bootstrap over the sources; the sweep's rule on the means). The curves show each "
    "mean with its interval across sources; the table shows which target classes are hard to reach.")


def _calibration_request(bundle_path: str, origin: str, per_class: float, targets: float, strengths: str,
                         seeds: str, steps: float, guidance: float, strategy: str, split: str, token: str):
    """The /calibrate API's parameters, in order, read once: (store, bundle, CalibrationRequest)."""
    return (open_store(token), open_bundle_cached(bundle_path),
            CalibrationRequest(origin, per_class, targets, strengths, seeds, steps, guidance, strategy, split))


def check_calibration(bundle_path: str, origin: str, per_class: float, targets: float, strengths: str, seeds: str,
                      steps: float, guidance: float, strategy: str, split: str, token: str) -> None:
    """Every setting of a calibration checked, its sources drawn and its images counted, before the
    model lane: a mistake is a message and the previous calibration stays on the page."""
    try:
        _, bundle, request = _calibration_request(bundle_path, origin, per_class, targets, strengths, seeds, steps,
                                                  guidance, strategy, split, token)
        plan_calibration(bundle, request, Limits.from_env())
    except (ValueError, FileNotFoundError) as err:
        raise _user_error(err, "calibrate") from None


def _calibration_progress(progress: gr.Progress, n_images: int):
    clock = ProgressClock(n_images)

    def report(stage: str, done: int, total: int) -> None:
        fraction, line = clock(stage, done, total)
        progress(fraction, desc=line)
    return report


@_errors
def on_calibrate(bundle_path: str, origin: str, per_class: float, targets: float, strengths: str, seeds: str,
                 steps: float, guidance: float, strategy: str, split: str, token: str, progress=gr.Progress()):
    """One calibration as one engine run: the recommendation, the curves, the per-class table, the
    sample grid and the files (calibration.json and the two pictures)."""
    store, bundle, request = _calibration_request(bundle_path, origin, per_class, targets, strengths, seeds, steps,
                                                  guidance, strategy, split, token)
    limits = Limits.from_env()
    n_images = len(plan_calibration(bundle, request, limits).jobs)
    progress(0, desc=f"{n_images} image(s): estimating…")
    cal, files = run_calibration(store, bundle, request, generate=_generate, limits=limits,
                                 progress=_calibration_progress(progress, n_images))
    header, rows = cal.table()
    grid = next(str(f) for f in files if f.name.endswith("grid.png"))
    return (store.token, calibration_markdown(cal), cal.figure(), {"headers": header, "data": rows}, grid,
            [str(f) for f in files])


@_errors
def on_save_calibration(bundle_path: str, token: str, request: gr.Request = None) -> str:
    """The session's last calibration of this bundle as the dataset's profile: its strength, sampler
    settings and summary (under the output root; the bundle's own files are never written)."""
    allowed, why = _save_state(request)
    if not allowed:
        raise ValueError(why)
    bundle = open_bundle_cached(bundle_path)
    path = save_to_profile(bundle, last_calibration(open_store(token), bundle))
    return f"saved to {md_code(path)}: {md_text(load_profile(bundle).strength_source())}"


def on_calibrate_bundle(path: str, request: gr.Request = None):
    """A bundle's sampler settings (its profile's) for the calibration, and whether this visitor may save."""
    try:
        bundle = open_bundle_cached(path)
        config = translate_config_for(bundle)
    except (ValueError, FileNotFoundError):
        bundle, config = None, TranslateConfig()
    # the inter-class strategies this bundle can run (a joint bundle: no ti-mix), by the engine's own rule
    offered = [name for name in INTER if bundle is None or not strategy_unavailable(name, bundle)] or list(INTER)
    strategy = config.strategy if config.strategy in offered else offered[0]
    return (gr.Dropdown(choices=offered, value=strategy), config.num_inference_steps, config.guidance_scale,
            gr.Button(interactive=_save_state(request)[0]))


def _calibrate_panel(ui: SimpleNamespace, limits: Limits) -> None:
    """Below the curation: the Calibrate mode's settings, its run, its results and the profile save."""
    data = app_dataset()
    origins = [EXAMPLES] + ([DATASET] if data else [])
    with gr.Accordion("Calibrate the dataset's strength (many sources x targets)", open=False, elem_id="calibrate"):
        gr.Markdown(CALIBRATE_INTRO)
        with gr.Row():
            ui.cal_origin = gr.Radio(origins, value=origins[-1], label="Sources from",
                                     info=f"dataset: {Path(data).name} (DIFFMIX_DATA)" if data else
                                     "start the app with DIFFMIX_DATA=DIR to draw them from a dataset")
            ui.cal_split = gr.Dropdown(list(SPLITS), value="train", label="Dataset split", visible=bool(data))
            ui.cal_per_class = gr.Number(value=2, precision=0, minimum=1, label="Sources per class (K)")
            ui.cal_targets = gr.Number(value=3, precision=0, minimum=0, label="Targets per source (M; 0 = all)")
        with gr.Row():
            ui.cal_strengths = gr.Textbox(value="0.3, 0.5, 0.7, 0.9", label="Strength list", max_length=MAX_TEXT,
                                          info="a list (0.3, 0.5, 0.7) or a range from:to:count (0.1:0.9:5)")
            ui.cal_seeds = gr.Textbox(value="0", label="Seed list", max_length=MAX_TEXT,
                                      info="a list (0, 1) or a count (n=2)")
            ui.cal_strategy = gr.Dropdown(list(INTER), value=INTER[0], label="Calibration strategy")
            ui.cal_steps = gr.Slider(1, 100, value=TranslateConfig.num_inference_steps, step=1,
                                     label="Calibration steps")
            ui.cal_guidance = gr.Slider(0, 20, value=TranslateConfig.guidance_scale, step=0.5,
                                        label="Calibration guidance")
        ui.cal_run = gr.Button(f"Run calibration (at most {limits.max_calibration_jobs} images)", variant="primary")
        ui.cal_text = gr.Markdown(elem_id="calibration-text", min_height=60)   # the progress bar shows here
        ui.cal_plot = gr.Plot(label="Per-strength means with 95 % intervals across sources", elem_id="calibration-plot")
        with gr.Row():
            ui.cal_table = gr.Dataframe(label="Per target class: hit rate per strength", max_height=300, scale=1)
            ui.cal_grid = gr.Image(label="Samples: rows = strengths, columns = sources", interactive=False,
                                   format="png", scale=1, buttons=["fullscreen"])
        with gr.Row():
            ui.cal_files = gr.File(label="Calibration files", file_count="multiple", interactive=False, scale=2)
            ui.cal_save = gr.Button("Save as the dataset's profile", scale=1)
        ui.cal_msg = gr.Markdown()


def _wire_calibrate(demo: gr.Blocks, ui: SimpleNamespace) -> None:
    """A bundle's settings into the calibration, the run (/calibrate, in the model lane) and the
    profile save (/save_calibration, then the bundle panel says where the strength came from)."""
    settings = [ui.cal_strategy, ui.cal_steps, ui.cal_guidance, ui.cal_save]
    demo.load(on_calibrate_bundle, ui.bundle, settings, **PRIVATE)
    ui.bundle.change(on_calibrate_bundle, ui.bundle, settings, **PRIVATE)
    inputs = [ui.bundle, ui.cal_origin, ui.cal_per_class, ui.cal_targets, ui.cal_strengths, ui.cal_seeds,
              ui.cal_steps, ui.cal_guidance, ui.cal_strategy, ui.cal_split, ui.token]
    ui.cal_run.click(check_calibration, inputs, None, **PRIVATE).success(
        on_calibrate, inputs, [ui.token, ui.cal_text, ui.cal_plot, ui.cal_table, ui.cal_grid, ui.cal_files],
        api_name="calibrate", concurrency_limit=1, concurrency_id="gpu", show_progress_on=ui.cal_text)
    ui.cal_save.click(on_save_calibration, [ui.bundle, ui.token], ui.cal_msg, api_name="save_calibration").success(
        bundle_info, ui.bundle, ui.info, **PRIVATE)
