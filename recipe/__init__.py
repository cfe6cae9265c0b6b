"""Llama 3 pretraining recipes: stages run as one resumable run (`herd recipe`, docs/recipe.md)."""
