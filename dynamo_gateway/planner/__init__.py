"""Dynamic scaling: decide how many workers each model's pools need, and get them.

``observe`` (what is seen), ``predict`` and ``profile`` (what is expected),
``policy`` and ``policies`` (pure decisions), ``connector`` and ``connectors``
(carrying them out), ``loop`` (the process that ties them together),
``config`` (its settings). docs/planner.md explains the whole.
"""
