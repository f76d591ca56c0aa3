"""Benchmarks: end-to-end model speed (``e2e``) and per-op microbenchmarks (``attention``, ``norms``,
``posenc``), reported as tables, JSON, Markdown and plots (``report``). The CLI is ``fastattn-bench``."""
