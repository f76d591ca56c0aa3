"""Runnable examples: ``python -m fastattn.examples.train`` trains the reference encoder-decoder on a task."""
