"""Corpus generation, load scenarios, and the report table and figure of `cliplens experiment`."""
