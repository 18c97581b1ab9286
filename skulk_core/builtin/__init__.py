"""Plugins that ship inside the core. Each can be blocked (``--no-plugin NAME``) or replaced."""
