"""The run modules: each turns a run config into MLflow runs (one module per entry point).

``skeleton`` is the skeleton they share (data, run identity, ``tracked_fit``, the test report);
``teacher``, ``distill``, ``sweep``, ``ablation``, ``pareto``, ``compare``, ``embed`` and ``serve`` are the
commands (a teacher run's cached outputs are a building block: ``flame_kd.teacher_cache``). Nothing is
imported here, so
``flame_kd.runs.distill`` loads only what distillation needs.
"""
