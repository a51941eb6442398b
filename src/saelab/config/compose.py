"""Composing a config with Hydra from saelab's config files and overrides, and turning Hydra's and
OmegaConf's errors into one line each.

Everything in saelab.config runs before any heavy import, so that bad input fails at once with one
line: `ConfigError(key, value, allowed)`, printed as `saelab: error: key=value: allowed` (exit 2).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any

from hydra import __version__ as hydra_version
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from saelab.config.schema import leaves, register
from saelab.errors import ConfigError

CONFIG_MODULE = "saelab.conf"
SCHEMA_KEYS = frozenset(k.path for k in leaves())

# Hydra 1.3, the final release the core installs, warns unless told version_base="1.3" and would
# otherwise behave as 1.1 did (a job changing into its folder, say); Hydra 1.4 has only its own
# behaviour and warns when given one (the [sweep] extra's release candidate).
VERSION_BASE = ({"version_base": "1.3"}
                if tuple(map(int, hydra_version.split(".")[:2])) < (1, 4) else {})


# ---------------------------------------------------------------------------------------------
# Composition


def config_groups() -> dict[str, list[str]]:
    """The config groups and their options (`group=option`), listed from the files in conf/
    (Hydra's own `hydra/` aside)."""
    conf = files(CONFIG_MODULE)
    groups = {d.name: sorted(p.name.removesuffix(".yaml") for p in d.iterdir()
                             if p.name.endswith(".yaml"))
              for d in conf.iterdir() if d.is_dir() and d.name != "hydra"}
    return {name: options for name, options in sorted(groups.items()) if options}


@contextmanager
def hydra_compose() -> Iterator:
    """Hydra's Compose API on saelab's configs, with the schema registered."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose beside it
        yield compose
        return
    with initialize_config_module(CONFIG_MODULE, **VERSION_BASE):
        yield compose


def compose_raw(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The composed config (with Hydra's own node if `hydra`), any Hydra or type error turned into
    a ConfigError naming the key."""
    with hydra_compose() as compose:
        try:
            cfg = compose("config", overrides=list(overrides), return_hydra_config=hydra)
        except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's errors, made one line
            raise composition_error(exc, overrides) from None
    check_keys(cfg)
    return cfg


def check_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Every key of `cfg` is a key of the schema: `+key=value` (which Hydra adds past the schema's
    type checks) cannot add one that saelab would ignore and then refuse to read back."""
    known = SCHEMA_KEYS
    for name in cfg:
        path = f"{prefix}{name}"
        if path in known or path == "hydra":
            continue
        node = cfg._get_node(name)
        if isinstance(node, DictConfig) and any(k.startswith(f"{path}.") for k in known):
            check_keys(node, f"{path}.")
            continue
        raise no_such_key(path, OmegaConf.select(cfg, str(name),
                                                 throw_on_resolution_failure=False),
                          "; `+` adds none to the schema")


def without_hydra(composed: DictConfig) -> tuple[DictConfig, DictConfig]:
    """A config composed with Hydra's node, split: the job's config and Hydra's node."""
    with open_dict(composed):
        hydra = composed.pop("hydra")
    return composed, hydra




def composition_error(exc: Exception, overrides: list[str]) -> ConfigError:
    """One line from Hydra's composition errors: unknown key or preset, wrong type, bad value."""
    from hydra.errors import MissingConfigException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in overrides
                 if "=" in o}
        return omegaconf_error(cause, given.get(cause.full_key))
    text = str(exc)
    if isinstance(exc, MissingConfigException) or "Could not find" in text:
        return missing_option(text, overrides)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ConfigError("overrides", " ".join(overrides), first)


def omegaconf_error(exc: OmegaConfBaseException, given: str | None = None) -> ConfigError:
    """A type or key error of OmegaConf on the schema, as key, value (`given` on the command line,
    if known) and what is allowed."""
    key = exc.full_key or "config"
    message = str(exc).splitlines()[0]
    value = given if given is not None else getattr(exc, "value", None)
    if "not in" in message or "Could not override" in message or "not found" in message:
        return no_such_key(key, value)
    if "expected one of" in message:
        return ConfigError(key, value, "allowed: " + message.split("expected one of ")[1]
                           .strip("[]").replace("'", ""))
    if "is not a valid bool" in message:
        return ConfigError(key, value, "must be true or false")
    if "is not a ListConfig" in message:
        return ConfigError(key, value, "must be a list, e.g. [1,2]")
    if "could not be converted to" in message:
        kind = message.rsplit(" ", 1)[1].lower()
        kind = {"float": "a number", "integer": "an integer", "boolean": "true or false",
                "string": "a string"}.get(kind, kind)
        return ConfigError(key, value, f"must be {kind}")
    return ConfigError(key, value, message)


def no_such_key(key: str, value: Any, why: str = "") -> ConfigError:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    listing = f"saelab --help {key.split('.')[0]}" if parent else "saelab --help"
    return ConfigError(key, value, f"no such key{f' in {parent}' if parent else ''}{why} (the "
                       f"keys: {listing})")


# Plugins named by a preset or override, and the extra that installs them.
PLUGINS = {"hydra/sweeper/optuna": "sweep", "hydra/launcher/joblib": "sweep",
           "hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/slurm": "slurm"}


def missing_option(text: str, overrides: list[str]) -> ConfigError:
    """An unknown preset (listing the known ones) or a plugin that is not installed (naming the
    extra that installs it)."""
    # "Could not find" an option of a group, "Could not load" a config that a preset's defaults
    # name (conf/hydra/launcher/slurm.yaml's submitit_slurm)
    found = re.search(r"Could not (?:find|load) '([^']*)'", text)
    missing = found.group(1) if found else ""
    for plugin, extra in PLUGINS.items():
        if missing.startswith(plugin):
            given = next((o for o in overrides if o.split("=")[0].lstrip("+~") in
                          ("hparams_search", "hydra/launcher", "hydra/sweeper")), missing)
            return ConfigError(*given.split("=", 1) if "=" in given else (given, ""),
                               f"needs a plugin that is not installed: pip install -e "
                               f"'.[{extra}]'")
    group, _, option = missing.rpartition("/")
    listed = text.split("Available options", 1)[-1].split("Config search path")[0]
    options = [line.strip() for line in listed.splitlines() if line.startswith("\t")]
    return ConfigError(group or "config", option,
                       f"no such preset; available: {', '.join(options) or 'none'}")


# ---------------------------------------------------------------------------------------------
# Rules


















# ---------------------------------------------------------------------------------------------
# Saved configs and resumption










