"""Fuzz harnesses: one per decoder. See fuzz/__main__.py for the runner."""
