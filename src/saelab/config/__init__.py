"""The configuration: the typed schema, the data sets' published facts, composition with
Hydra, the rules checked before anything runs, resumed configs and tuning spaces. Torch-free."""
