"""One training run and what it is made of: the LightningModule, the nets, checkpoints, its MLflow record.
Imports nothing from lab.sweep or lab.analysis (tests/test_layers.py)."""
