"""Tooling around training, outside the config -> mesh -> parallelize -> trainer path.

- ``dry_run``: a rank's memory and communication estimate on a fake process group (no data,
  no devices); ``scripts/plan.py`` and ``scripts/check_dry_run.py``. Its formulas:
  ``memory_estimate`` (activations) and ``comm_estimate`` (bytes and collective calls per kind
  of traffic); ``measure``: the real runs' numbers ``scripts/check_dry_run.py`` checks them
  against.
- ``auto_mesh``: the per-stage mesh planner of a curriculum (``curriculum.auto_mesh``), from the
  dry run's estimates.
- ``parity``: launches many mesh shapes per torchrun and compares their losses, grad norms and
  gradients with a 1-rank run (``scripts/parity_matrix.py``, ``tests/test_parity.py``).
- ``ablation``: the mesh-shape ablation sweep and report (``scripts/ablate_mesh.py``).
"""
