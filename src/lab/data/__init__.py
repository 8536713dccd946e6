"""Datasets as LightningDataModules: each file one source, all sharing base.TensorDataModule."""
