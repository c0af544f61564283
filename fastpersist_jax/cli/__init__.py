"""Command-line tools: `python -m fastpersist_jax verify|inspect|export`.

Each command's logic is a module here; fastpersist_jax/__main__.py parses
the flags (absl) and dispatches.
"""
