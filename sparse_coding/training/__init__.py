"""Stage 5, training: the sweep config (config.py), the lockstep trainer (trainer.py), its checkpoints
(checkpoint.py), training log (log.py) and multi-process splits (distributed.py)."""
