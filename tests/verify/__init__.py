"""Tests of stage 6, verification, the held-out check and step speed (``autoprec/verify/``)."""
