"""The config layer: a config space read into frozen, typed data.

Nothing here runs a command or writes a file; nothing here imports from the
host, cache, stages or inspect layers. See docs/architecture.md.
"""
