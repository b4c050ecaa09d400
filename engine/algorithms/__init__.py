"""One module per algorithm: its data, its loss and its evaluation, read top to bottom.

Each module's ``run(config, warm_start=None)`` returns the run's final metrics and paths;
the module's name is the algorithm's name in ``config.ALGORITHMS``. The shared loop
(``engine/loop.py``) does the training itself, with AdamW's step or the algorithm's own
update (trpo's).
"""
