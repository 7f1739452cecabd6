"""Training and fine-tuning."""
from .recipes import RECIPES, Recipe, get_recipe
from .trainer import TrainResult, Trainer

__all__ = ["RECIPES", "Recipe", "TrainResult", "Trainer", "get_recipe"]
