"""The corpus of bad inputs: each case is data (files, a command line, the expected error), run by one test.

See tests/bad_inputs/test_corpus.py for what every case must show, and docs/RELIABILITY.md ("Bad input").
"""
