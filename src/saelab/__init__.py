"""saelab: config-driven experiments with greedy layer-wise stacked autoencoders.

The Python API (imported lazily, so that the command line starts without torch):

    saelab.compose(overrides)         the validated config of a run
    saelab.run(overrides, run_dir)    a run, exactly as `saelab overrides` does it; its metrics
    saelab.load_run(run_dir)          a finished run, read only: config, metrics, networks
    saelab.figures(run, *names)       its figures as matplotlib figures (inline in Jupyter)
"""

__version__ = "0.4.0"  # the one place it is written (pyproject.toml reads it)
__all__ = ["compose", "figures", "load_run", "run"]


def __getattr__(name: str):
    if name == "compose":
        from saelab.config.job import compose

        return compose
    if name == "run":
        from saelab.api import run

        return run
    if name == "load_run":
        from saelab.experiment.run import load_run

        return load_run
    if name == "figures":
        from saelab.report.build import figures

        return figures
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")
