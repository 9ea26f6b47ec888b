"""Stage 1, text and synthetic data: documents from the hub or local files and their token rows (text.py), the
tiny transformer's corpus (corpus.py), and the toy generator with known ground-truth features (toy.py)."""
