"""Training and fine-tuning."""
from .recipes import ARCHS, GENERIC, RECIPES, Recipe, finetune, get_recipe, recipe_for_data, scratch
from .trainer import TrainResult, Trainer

__all__ = ["ARCHS", "GENERIC", "RECIPES", "Recipe", "TrainResult", "Trainer", "finetune", "get_recipe", "recipe_for_data", "scratch"]
