"""Data sources and batch order."""
