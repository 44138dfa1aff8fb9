"""Tests of the up-front checks of tune's inputs (``autoprec/core/``)."""
