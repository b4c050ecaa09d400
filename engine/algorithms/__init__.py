"""One module per algorithm: its data, its loss and its evaluation, read top to bottom.

Each module's ``run(config)`` returns the run's final metrics and paths; the shared loop
(``engine/loop.py``) does the training itself.
"""
