"""Tables, token-map pictures and reports."""
from .tables import results_table
from .token_maps import TokenMap, denormalize, save_token_maps

__all__ = ["TokenMap", "denormalize", "results_table", "save_token_maps"]
