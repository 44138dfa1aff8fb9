"""Tests of stage 1, trace (``autoprec/trace/``)."""
