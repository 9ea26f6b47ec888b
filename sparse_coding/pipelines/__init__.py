"""Thin pipelines wiring the stages for each entry script: toy.py (replicate_toy_models.py), lm.py (run.py),
interpret.py (interpret.py)."""
