"""The ``run`` command's own pieces: the stages chained, the accuracy-budget search, the summary.

* :mod:`cahp_deploy.run.stage` — ``run``: select → prune → recover → export → bench → confirm, in order.
* :mod:`cahp_deploy.run.plan` — ``run``'s options checked and what each stage will be asked, before any starts.
* :mod:`cahp_deploy.run.record` — ``run.json``: what every stage saw and made; resume.
* :mod:`cahp_deploy.run.accuracy_budget` — ``--max-accuracy-drop``: the search down the ladder, ``search.json``.
* :mod:`cahp_deploy.run.candidates` — one candidate: its cut pruned, recovered, measured, cached.
* :mod:`cahp_deploy.run.budget_search` — the pure search order over candidates (no torch).
* :mod:`cahp_deploy.run.progressive` — the progressive ladder's rungs (``--ladder macs``).
* :mod:`cahp_deploy.run.promise` — the confirmation on rows no decision saw, ``confirm.json``.
* :mod:`cahp_deploy.run.promise_simulation` — the whole decision logic simulated (no model): how often it ships above the budget.
* :mod:`cahp_deploy.run.summarize` — the summary read back from the files the stages wrote; the printed table.
* :mod:`cahp_deploy.run.summary` — ``summary.md``: the answer in words.

Nothing is imported here, so ``cahp-deploy --help`` stays light.
"""
