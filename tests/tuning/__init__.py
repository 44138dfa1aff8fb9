"""Tests of autoprec.tune as a whole (``autoprec/tuning/``)."""
