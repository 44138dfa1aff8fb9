"""Tests of stage 3, search and its storage (``autoprec/search/``)."""
