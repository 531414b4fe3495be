"""What a run leaves for people to read.

- ``report``: the run report (``db/_runs/<run_id>.json``): counts, throughput, resources, stage times.
- ``charts``: the run's charts as matplotlib figures, written as inline SVG for the pages or as a PNG.
- ``pages``: the run pages (a run's dashboard, the list of runs) rendered from the templates in
  ``templates/``.
"""
