"""Training: config, data pipelines, model, engine and the `python -m train.main` CLI."""
