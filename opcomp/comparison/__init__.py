"""The main job: optimizers trained side by side on one task, tuned alike, reported together.

- :mod:`~opcomp.comparison.runs`: ``opcomp compare`` and :func:`opcomp.compare` (training, tuning, seeds);
- :mod:`~opcomp.comparison.results`: what a run records;
- :mod:`~opcomp.comparison.report`: the table, plots, report.md and results.json;
- :mod:`~opcomp.comparison.tasks`, :mod:`~opcomp.comparison.data`, :mod:`~opcomp.comparison.models`:
  the built-in tasks, their data sets and models;
- :mod:`~opcomp.comparison.footprint`: passes per step and state per parameter.
"""
