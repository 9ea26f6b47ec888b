"""Stage 3, activations: the resumable on-disk store (store.py), filling it from a model and text (caching.py),
and shuffled training batches drawn from it (batches.py)."""
