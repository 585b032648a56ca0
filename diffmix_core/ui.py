"""The Gradio app: pick a bundle and a source image, sweep strength, look at the
scores, curate, tune the dataset's profile, export.

Nothing here computes: the handlers collect settings and call session.py (which
calls the same translate(), scoring and export writers as the CLI), then shape
the results for the components. Sessions keep only a token (gr.State, mirrored
in gr.BrowserState so a page reload finds the session again); images and
records live on disk in the session's folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradio as gr

from . import session as S
from .adapters import load_bundle
from .config import STRATEGIES, TranslateConfig
from .data import load_image
from .translate import Source

try:   # ZeroGPU on Hugging Face Spaces; a no-op elsewhere
    import spaces

    GPU = spaces.GPU
except ImportError:
    def GPU(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

_generate = GPU(S.generate)
TH_KEYS = tuple(S.THRESHOLDS)


def _errors(fn):
    """Library errors (ValueError / FileNotFoundError) become a gr.Error the user can read."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            raise gr.Error(str(err)) from None
    return wrapped


# --------------------------------------------------------------------------- views
def curated_views(store: S.Store) -> tuple:
    """(count, curated gallery, curated checkboxes, this-sweep checkboxes) of a session."""
    state, records = store.state(), store.records()
    cur = [i for i in state["curated"] if i in records]
    items = [(store.image_path(records[i]), S.caption(records[i])) for i in cur]
    choices = [(_short(records[i]), i) for i in cur]
    in_sweep = [i for i in state["last_sweep"] if i in set(cur)]
    count = f"**Curated batch: {len(cur)} image(s)** (limit {S.Limits.from_env().max_curated})"
    return count, items, gr.CheckboxGroup(choices=choices, value=cur), gr.CheckboxGroup(value=in_sweep)


def _short(r: dict) -> str:
    return f"{r['source_class']}→{r['target_class']} s={r['strength']:.2f} seed {r['seed']} ({r['id'][:6]})"


def sweep_views(store: S.Store, figure=None) -> tuple:
    """(results gallery, sweep checkboxes, table, plot, CSV path, status) of the last sweep."""
    state, records = store.state(), store.records()
    recs = [records[i] for i in state["last_sweep"] if i in records]
    columns = len({r["seed"] for r in recs}) or 2
    gallery = gr.Gallery(value=[(store.image_path(r), S.caption(r)) for r in recs], columns=columns)
    box = gr.CheckboxGroup(choices=[(_short(r), r["id"]) for r in recs],
                           value=[r["id"] for r in recs if r["id"] in set(state["curated"])])
    rows = S.table(recs, set(state["curated"]))
    csv = str(S.write_csv(store.root / f"sweep-{state['sweeps']}.csv", rows)) if recs else None
    summary = state.get("summary")
    if figure is None and summary:
        from .scoring import plot_sweep

        figure = plot_sweep(summary)
    status = ""
    if summary:
        status = (f"recommended strength: **{summary.get('recommended_strength')}** "
                  f"({summary.get('recommendation')}) · {summary.get('clip')}")
    return gallery, box, rows, figure, csv, status


# --------------------------------------------------------------------------- handlers
@_errors
def on_bundle(path: str):
    """Bundle panel, example gallery, class dropdowns and the profile's strength / thresholds."""
    bundle = load_bundle(path)
    _, ref_status = S.reference_for(bundle)
    info = S.bundle_markdown(bundle, S.clip_scorer(bundle).status, ref_status)
    classes = list(bundle.classes)
    examples = S.bundle_examples(bundle)
    profile = S.bundle_profile(bundle)
    th = profile.get("thresholds") or {}
    strength = profile.get("strength", bundle.meta.get("recommended_strength"))
    defaults = TranslateConfig()
    return (info, [(p, c) for p, c in examples], gr.Dropdown(choices=classes, value=classes[0]),
            gr.Dropdown(choices=[S.ALL_OTHER] + classes, value=classes[min(1, len(classes) - 1)]),
            strength, *[th.get(k) for k in TH_KEYS],
            profile.get("strategy", "diff-mix"), profile.get("num_inference_steps", defaults.num_inference_steps),
            profile.get("guidance_scale", defaults.guidance_scale))


@_errors
def on_bundle_text(text: str):
    """Add a bundle folder or Hub repo id to the dropdown and select it."""
    path = str(S.resolve_bundle(text))
    choices = [(k, v) for k, v in S.find_bundles().items() if v != path]
    return gr.Dropdown(choices=choices + [(f"{text.strip()} ({path})", path)], value=path)


@_errors
def on_example(path: str, evt: gr.SelectData):
    examples = S.bundle_examples(load_bundle(path))
    image, cls = examples[evt.index]
    return image, cls, load_image(image)


@_errors
def on_upload(upload: str | None):
    if not upload:
        return None, ""
    S.check_upload(upload, S.Limits.from_env())
    return load_image(upload), ""


def _source(store: S.Store, bundle, upload: str | None, example: str | None, source_class: str) -> Source | None:
    """The source image: an upload (decoded by data.load_image), else a bundle example."""
    if upload:
        S.check_upload(upload, S.Limits.from_env())
        image = load_image(upload)
        return Source(image, source_class, Path(upload).stem, store.save_source(image, Path(upload).name))
    if example:
        allowed = {p for p, _ in S.bundle_examples(bundle)}
        if str(Path(example).resolve()) not in {str(Path(p).resolve()) for p in allowed}:
            raise ValueError(f"{example} is not one of the bundle's example images")
        return Source(load_image(example), source_class, Path(example).stem, example)
    return None


@_errors
def on_sweep(bundle_path: str, upload: str | None, example: str | None, source_class: str, target: str,
             strengths: str, seeds: str, steps: float, guidance: float, strategy: str, token: str,
             progress=gr.Progress(track_tqdm=True)):
    """One sweep through the engine; rows = strength, columns = seed."""
    store = S.open_store(token)
    bundle = load_bundle(bundle_path)
    source = _source(store, bundle, upload, example, source_class)
    out = S.run_sweep(store, bundle, source, source_class, target, strengths, seeds, int(steps), float(guidance),
                      strategy, limits=S.Limits.from_env(), generate_fn=_generate)
    gallery, box, rows, fig, csv, status = sweep_views(store, out.figure)
    status = " · ".join([status] + [n for n in out.notes if n not in status])
    rec = (out.summary or {}).get("recommended_strength")
    return (store.token, gallery, box, rows, fig, csv, status, rec, *curated_views(store)[:3])


@_errors
def on_select(token: str, ids: str, mode: str):
    """API: change the curated batch by ids (comma-separated); mode add / remove / toggle / set."""
    store = S.open_store(token)
    S.update_curated(store, [i for i in ids.replace(",", " ").split() if i], mode or "add", S.Limits.from_env())
    return (store.token, *curated_views(store))


@_errors
def on_pick(token: str, evt: gr.SelectData):
    """A click on a result toggles it in the curated batch (real multi-select)."""
    store = S.open_store(token)
    sweep = store.state()["last_sweep"]
    if 0 <= evt.index < len(sweep):
        S.update_curated(store, [sweep[evt.index]], "toggle", S.Limits.from_env())
    return (store.token, *curated_views(store))


@_errors
def on_sweep_box(token: str, ids: list[str]):
    store = S.open_store(token)
    S.update_curated(store, ids or [], "set", S.Limits.from_env())
    return (store.token, *curated_views(store))


@_errors
def on_curated_box(token: str, ids: list[str]):
    store = S.open_store(token)
    removed = [i for i in store.state()["curated"] if i not in set(ids or [])]
    S.update_curated(store, removed, "remove")
    return (store.token, *curated_views(store))


@_errors
def on_auto(token: str, min_p_target: float | None, max_p_source: float | None, min_clip_target: float | None,
            min_distance: float | None, max_distance: float | None, max_ssim: float | None):
    """Add every image of the last sweep that meets the thresholds (empty = off)."""
    store = S.open_store(token)
    records = store.records()
    recs = [records[i] for i in store.state()["last_sweep"] if i in records]
    thresholds = dict(zip(TH_KEYS, (min_p_target, max_p_source, min_clip_target, min_distance, max_distance,
                                    max_ssim)))
    ids, notes = S.passing(recs, thresholds)
    S.update_curated(store, ids, "add", S.Limits.from_env())
    msg = f"auto-selected {len(ids)} of {len(recs)} image(s) of the last sweep" + "".join(f"\n\n{n}" for n in notes)
    return (store.token, msg, *curated_views(store))


@_errors
def on_save_profile(bundle_path: str, strength: float, strategy: str, steps: float, guidance: float,
                    min_p_target: float | None, max_p_source: float | None, min_clip_target: float | None,
                    min_distance: float | None, max_distance: float | None, max_ssim: float | None):
    """Write the chosen strength and thresholds into the bundle's profile (adapter.json)."""
    thresholds = dict(zip(TH_KEYS, (min_p_target, max_p_source, min_clip_target, min_distance, max_distance,
                                    max_ssim)))
    bundle = S.save_profile(bundle_path, strength, thresholds, {
        "strategy": strategy, "num_inference_steps": int(steps), "guidance_scale": float(guidance)})
    return f"saved to `{bundle.path / 'adapter.json'}`: strength {strength}, thresholds {S.clean_thresholds(thresholds)}"


@_errors
def on_export(token: str):
    """Export the curated batch (imagefolder + meta.csv + manifest + zip) into a new folder."""
    store = S.open_store(token)
    folder, zip_path = S.export_curated(store)
    served = store.root / "downloads" / zip_path.name   # served from the session folder (temp dir)
    served.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(zip_path, served)
    except OSError:
        shutil.copyfile(zip_path, served)
    n = len(store.state()["curated"])
    return (store.token, f"exported {n} image(s) to `{folder}` (and `{zip_path.name}`)", str(folder), str(served))


@_errors
def on_clear(token: str):
    store = S.open_store(token)
    S.update_curated(store, store.state()["curated"], "remove")
    return (store.token, *curated_views(store))


def on_restore(saved: str, token: str):
    """Page (re)load: find the session of the browser's token, else start one."""
    store = S.open_store(token or saved)
    views = sweep_views(store) if store.state()["last_sweep"] else (gr.Gallery(), gr.CheckboxGroup(),
                                                                    None, None, None, "")
    return (store.token, store.token, *views, *curated_views(store)[:3])


# --------------------------------------------------------------------------- layout
INTRO = ("# diffmix — Diff-Mix inter-class translation\n"
         "Pick an adapter bundle and a source image, sweep the translation strength (rows) over seeds "
         "(columns), judge the scores, click results to curate them, export the batch.")


def build_demo() -> gr.Blocks:
    bundles = S.find_bundles()
    first = next(iter(bundles.values()))
    S.clip_scorer(load_bundle(first))   # start loading its CLIP in the background now, not on the first sweep
    classes = list(load_bundle(first).classes)
    limits = S.Limits.from_env()
    with gr.Blocks(title="diffmix") as demo:
        token = gr.State("")
        saved_token = gr.BrowserState("", storage_key="diffmix-session")
        gr.Markdown(INTRO)
        with gr.Row():
            bundle = gr.Dropdown(choices=[(k, v) for k, v in bundles.items()], value=first, label="Adapter bundle",
                                 scale=3)
            bundle_text = gr.Textbox(label="…or a bundle folder / Hub repo id", placeholder="owner/name", scale=2)
            load_btn = gr.Button("Load bundle", scale=1)
        info = gr.Markdown()
        with gr.Row():
            with gr.Column(scale=1):
                examples = gr.Gallery(label="Example sources (click one)", columns=4, height=180, format="png",
                                      allow_preview=False, elem_id="examples")
                upload = gr.File(label=f"…or upload a source image (≤ {limits.max_upload_mb} MB)",
                                 file_types=["image"], type="filepath")
                example = gr.Textbox(label="Example chosen", interactive=False)
                preview = gr.Image(label="Source as decoded", interactive=False, format="png", height=160)
                # Choices follow the bundle; the library validates names, so API callers may type any bundle's.
                source_class = gr.Dropdown(classes, value=classes[0], label="Source class", filterable=True,
                                           allow_custom_value=True)
                target = gr.Dropdown([S.ALL_OTHER] + classes, value=classes[1], label="Target class",
                                     filterable=True, allow_custom_value=True)
                strategy = gr.Dropdown(choices=list(STRATEGIES), value="diff-mix", label="Strategy")
                strengths = gr.Textbox(value="0.3, 0.5, 0.7, 0.9", label="Strengths",
                                       info="a list (0.3, 0.5, 0.7) or a range from:to:count (0.1:0.9:5)")
                seeds = gr.Textbox(value="0, 1", label="Seeds", info="a list (0, 1, 7) or a count (n=4)")
                steps = gr.Slider(1, 100, value=TranslateConfig.num_inference_steps, step=1, label="Steps")
                guidance = gr.Slider(0, 20, value=TranslateConfig.guidance_scale, step=0.5, label="Guidance")
                run = gr.Button("Run sweep", variant="primary")
            with gr.Column(scale=2):
                status = gr.Markdown()
                results = gr.Gallery(label="Results (rows: strength, columns: seed; click to curate)", columns=2,
                                     format="png", allow_preview=False, object_fit="contain",
                                     height="auto", elem_id="results")
                sweep_box = gr.CheckboxGroup(label="Curate from this sweep")
                plot = gr.Plot(label="Faithfulness / diversity vs strength", elem_id="plot")
                table = gr.Dataframe(headers=list(S.TABLE_COLUMNS), label="Scores and records", max_height=300)
                csv = gr.DownloadButton("Download table (CSV)")
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Thresholds and per-dataset profile")
                with gr.Row():
                    th = [gr.Number(label=label, value=None) for label in (
                        "min P(target)", "max P(source)", "min CLIP(target)", "min distance", "max distance",
                        "max SSIM")]
                with gr.Row():
                    auto_btn = gr.Button("Auto-select last sweep by thresholds")
                    tune = gr.Number(label="Chosen strength", minimum=0, maximum=1)
                    profile_btn = gr.Button("Save strength + thresholds to bundle profile")
                auto_msg = gr.Markdown()
                profile_msg = gr.Markdown()
            with gr.Column():
                count = gr.Markdown("**Curated batch: 0 image(s)**")
                cur_gallery = gr.Gallery(label="Curated batch", columns=6, height=200, format="png",
                                         allow_preview=False, object_fit="contain", elem_id="curated")
                cur_box = gr.CheckboxGroup(label="Curated (uncheck to remove)")
                with gr.Row():
                    clear_btn = gr.Button("Clear batch")
                    export_btn = gr.Button("Export batch", variant="primary")
                export_msg = gr.Markdown()
                export_dir = gr.Textbox(label="Export folder", interactive=False)
                export_zip = gr.DownloadButton("Download export (zip)")
        # API-only inputs for /select (scripts choose ids; people click)
        sel_ids = gr.Textbox(visible=False)
        sel_mode = gr.Textbox(value="add", visible=False)
        sel_btn = gr.Button(visible=False)

        curated = [count, cur_gallery, cur_box, sweep_box]
        private = {"api_visibility": "private"}
        bundle_outputs = [info, examples, source_class, target, tune, *th, strategy, steps, guidance]
        demo.load(on_restore, [saved_token, token], [token, saved_token, results, sweep_box, table, plot, csv,
                                                     status, count, cur_gallery, cur_box], **private)
        demo.load(on_bundle, bundle, bundle_outputs, **private)
        bundle.change(on_bundle, bundle, bundle_outputs, api_name="bundle_info")
        load_btn.click(on_bundle_text, bundle_text, bundle, **private)
        examples.select(on_example, bundle, [example, source_class, preview], **private)
        upload.change(on_upload, upload, [preview, example], **private)
        run.click(on_sweep, [bundle, upload, example, source_class, target, strengths, seeds, steps, guidance,
                             strategy, token],
                  [token, results, sweep_box, table, plot, csv, status, tune, count, cur_gallery, cur_box],
                  api_name="sweep", concurrency_limit=1, concurrency_id="gpu")
        results.select(on_pick, token, [token, *curated], **private)
        sweep_box.input(on_sweep_box, [token, sweep_box], [token, *curated], **private)
        cur_box.input(on_curated_box, [token, cur_box], [token, *curated], **private)
        sel_btn.click(on_select, [token, sel_ids, sel_mode], [token, *curated], api_name="select")
        auto_btn.click(on_auto, [token, *th], [token, auto_msg, *curated], api_name="auto_select")
        clear_btn.click(on_clear, token, [token, *curated], api_name="clear")
        profile_btn.click(on_save_profile, [bundle, tune, strategy, steps, guidance, *th], profile_msg,
                          api_name="save_profile").then(on_bundle, bundle, bundle_outputs, **private)
        export_btn.click(on_export, token, [token, export_msg, export_dir, export_zip], api_name="export")
    demo.queue(max_size=limits.queue_size)
    return demo
