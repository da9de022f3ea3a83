"""Headless trainer and demo: `python -m trainer --help`."""
