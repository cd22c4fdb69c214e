"""The ``run`` command's own pieces: the stages chained, the accuracy-budget search, the summary.

* :mod:`cahp_deploy.run.pipeline` — ``run``: select → prune → recover → export → bench, ``run.json``, resume.
* :mod:`cahp_deploy.run.accuracy_budget` — ``--max-accuracy-drop``: candidates pruned, recovered, measured.
* :mod:`cahp_deploy.run.budget_search` — the pure search order over candidates (no torch).
* :mod:`cahp_deploy.run.summary` — ``summary.md``: the answer in words.

Nothing is imported here, so ``cahp-deploy --help`` stays light.
"""
