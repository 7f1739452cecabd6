"""Tables, token-map pictures and reports."""
from .pareto import save_pareto
from .tables import results_table
from ..runtime.token_map import TokenMap
from .token_pictures import denormalize, save_token_maps

__all__ = ["TokenMap", "denormalize", "results_table", "save_pareto", "save_token_maps"]
