"""Kinds of model and data the loop trains: classifiers and causal language models."""
