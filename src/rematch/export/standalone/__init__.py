"""Files copied verbatim into exported checkpoints.

Nothing here imports rematch: an exported directory must work for someone who has only
``transformers`` (and ``sentence-transformers`` for that format). The tests import these
files from here and run them against exports, so the documented lines cannot drift from
what the package writes.
"""
