"""The method comparison behind ``experiments/results/study``.

* :mod:`cahp_deploy.study.stage` — every method at every budget, before and after recovery, cached per cell.
* :mod:`cahp_deploy.study.sensitivity` — how CAHP's knee moves with its options.
* :mod:`cahp_deploy.study.report` — ``study.json``, ``study.md`` and plots.

Nothing is imported here, so ``cahp-deploy --help`` stays light.
"""
