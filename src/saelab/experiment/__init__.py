"""An experiment: its stages, their keys and fingerprints, the training recipe, which
checkpoint may stand for a stage, the metrics record, progress, loggers, and a run read back."""
