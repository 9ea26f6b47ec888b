"""Remote GPU box helpers: rent a vast.ai box, sync the repo and secrets, launch runs, fetch results.

Run `python -m vastai --help`; everything lives in `vastai/box.py`.
"""
