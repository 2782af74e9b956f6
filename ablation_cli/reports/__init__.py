"""Outputs for people: status views, merge outputs (tables, plots), comparisons and feature exports.

    status_view.py  the status grid and totals as text
    terminal.py     everything drawn with rich (the only module that imports it)
    merge.py        results.json/.md/.csv/.tex and plots/ from the checkpoints
    tables.py       the markdown, CSV and LaTeX tables; statistics between layer configs
    plots.py        matplotlib figures (an optional extra), written atomically
    compare.py      `ablate compare`: one table and plot across experiments
    export.py       `ablate features`: features as plain arrays
"""
