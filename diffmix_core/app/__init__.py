"""The app's state, as plain functions (no ``gr.*``); ui.py turns them into Gradio events and
tests call them directly.

- ``store``: a session's folder (its images, records and curated batch), the request limits,
  pruning of idle sessions and old exports, the export of a curated batch;
- ``cache``: what one process holds for every session: the bundles the app offers, each
  bundle verified once per change of its files, the pipeline, CLIP and reference classifier;
- ``sweep``: one sweep, asked for as a :class:`~diffmix_core.app.sweep.SweepRequest`: planned
  (every setting checked, nothing run), made, scored and stored; the threshold auto-select;
- ``calibration``: the Calibrate mode: a dataset's strength from many sources and targets
  (calibrate.calibrate on the process's engine), checked before the model lane, its files in
  the session, read back to save as the dataset's profile;
- ``views``: what the page shows (bundle panel, captions, the score table and its CSV, the
  command that makes a result again), as Markdown-safe text.
"""
