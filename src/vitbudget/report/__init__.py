"""Tables and reports."""
from .tables import results_table

__all__ = ["results_table"]
