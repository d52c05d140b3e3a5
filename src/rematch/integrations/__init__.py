"""ReMatch inside other people's evaluation tools (optional extras, imported only when used).

* :mod:`rematch.integrations.mteb` -- a ReMatch model as an mteb encoder, with its ModelMeta
  (``pip install 'rematch[mteb]'``);
* :mod:`rematch.integrations.mteb_run` -- ``rematch eval mteb``: resolve tasks, run them,
  write the results and a summary.
"""
