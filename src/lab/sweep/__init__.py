"""A sweep: the sweep file, the Optuna study, one trial, the worker loop, the pool, the live view, the sweep's
MLflow records and the `lab sweep/worker/best` commands. Builds on lab.train; nothing below imports it."""
