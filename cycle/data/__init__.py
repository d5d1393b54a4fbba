"""Data: the built-in emoji-scenes dataset (`cycle.data.emoji`), ingest of your own pairs, loaders."""
