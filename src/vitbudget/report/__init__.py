"""Tables, token-map pictures and reports."""
from .pareto import save_pareto
from .tables import results_table
from .token_maps import TokenMap, denormalize, save_token_maps

__all__ = ["TokenMap", "denormalize", "results_table", "save_pareto", "save_token_maps"]
