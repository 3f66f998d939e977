"""Knowledge distillation: recipes, teacher cards, matchings, losses, the D3ETR loss and trainer."""
