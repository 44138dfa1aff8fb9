"""Stage 3, search: which layers run in which format (the Optuna study, its storage, split across ranks) and the loss scale."""

from __future__ import annotations

from ._loss_scale import grad_trajectory, loss_table, search_scaler, simulate
from ._records import Decision, Tolerance
from ._search import SearchResult, run_study, search
from ._split import run_split_study
from ._storage import open_storage

__all__ = ["Decision", "SearchResult", "Tolerance", "grad_trajectory", "loss_table", "open_storage", "run_split_study", "run_study", "search", "search_scaler", "simulate"]
