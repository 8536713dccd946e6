"""lab: hyperparameter experiments for image classification. The layers, top to bottom: cli -> analysis ->
sweep -> train -> data (docs/design.md)."""
