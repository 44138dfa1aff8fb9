"""Tests of the guard (``autoprec/watch/``)."""
