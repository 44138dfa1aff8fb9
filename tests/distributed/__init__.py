"""Tests of several processes (``autoprec/distributed/``)."""
