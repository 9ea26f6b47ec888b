"""Stage 6, metrics: pure metric functions (metrics.py), scoring stacks on held-out data (reconstruction.py),
result rows, saved SAEs and grid heatmaps (report.py), and the plots themselves (plots.py)."""
