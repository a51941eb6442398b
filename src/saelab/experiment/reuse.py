"""Whether a stage is trained or taken from a checkpoint: the one place that decides.

Before anything trains, `saved_stages` reads every checkpoint the run folder holds. One of another
config (its fingerprint differs: the message names the first key that does), of another checkpoint
format, or of a stage this config does not have stops the run (`overwrite=true` removes saelab's
files instead); a damaged one is trained again.

When a stage's turn comes, `reusable` decides: its checkpoint (the folder's, else the store's)
stands for it only if none of the stages it consumes was trained in this invocation and it started
from the random state the stage starts from now. So a stage whose input was trained again is
trained again too, and a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError
from saelab.experiment.fingerprints import Planned
from saelab.runs.checkpoints import DamagedCheckpoint, Store, other_format, read_checkpoint
from saelab.runs.folder import RunFolder

log = logging.getLogger("saelab")

RUN_DIR = "RUN_DIR"  # the argument that names a finished run to read


def first_difference(saved: dict, planned: Planned) -> tuple[str, Any, Any]:
    """(key, value here, value there) of the first key value that differs, else the data files,
    else the first consumed stage."""
    values = saved.get("values", {})
    for key, value in planned.values.items():
        if values.get(key, "<absent>") != value:
            return key, value, values.get(key, "<absent>")
    if saved.get("data") != planned.data:
        return "data files (md5)", planned.data, saved.get("data")
    for name, fingerprint in planned.consumes.items():
        if saved.get("consumes", {}).get(name) != fingerprint:
            return f"stage {name}", fingerprint, saved.get("consumes", {}).get(name)
    return "fingerprint", planned.fingerprint, saved.get("fingerprint")


def saved_stages(folder: RunFolder, plan: dict[str, Planned], overwrite: bool
                 ) -> dict[str, dict | None]:
    """The checkpoints of `folder` that are this config's, by stage (None: none, or damaged),
    checked before anything is written; ConfigError on one of another config (see above)."""
    found = folder.prepare(overwrite, list(plan))
    saved: dict[str, dict | None] = {}
    for name, planned in plan.items():
        path, contents = found.get(name), None
        if path is not None:
            try:
                contents = read_checkpoint(path)
            except DamagedCheckpoint as exc:
                log.warning("%s: retraining %s and every stage that consumes it", exc, name)
            else:
                if other_format(contents):
                    raise ConfigError("checkpoints", str(path), f"{other_format(contents)}; use "
                                      "a new folder or overwrite=true")
                if contents["fingerprint"] != planned.fingerprint:
                    key, here, there = first_difference(contents, planned)
                    raise ConfigError(key, here, f"{folder.path} holds stage {name} trained "
                                      f"with {there!r}; use a new folder or overwrite=true")
        saved[name] = contents
    extra = sorted(found.keys() - plan.keys())
    if extra:
        raise ConfigError(extra[0], "checkpoint", f"{folder.path} holds checkpoints/"
                          f"{extra[0]}.pt, a stage this config does not have; use a new "
                          "folder or overwrite=true")
    folder.owned = True
    return saved


def reusable(planned: Planned, saved: dict | None, trained: set[str], store: Store | None,
             start: str, checkpoint: Path) -> tuple[dict, str] | None:
    """The checkpoint that stands for `planned`'s stage now and where it came from ("checkpoint"
    or "store:PATH"), or None to train it. `saved`: the run folder's (at `checkpoint`);
    `trained`: the stages trained in this invocation; `start`: the digest of the random state
    the stage starts from."""
    stage = planned.stage
    fresh = [c for c in stage.consumes if c in trained]
    if fresh:
        if saved is not None:
            log.info("%s: retrained because %s was", stage.label, fresh[0])
        return None
    origin, source = "checkpoint", checkpoint
    if saved is None and store is not None:
        source = store.entry(stage.name, planned.fingerprint)
        saved, origin = store.get(stage.name, planned.fingerprint), f"store:{source}"
    if saved is None:
        return None
    if saved["rng_in"] != start:
        log.warning("%s: %s started from another random state; retraining", stage.label, source)
        return None
    log.info("%s: loaded from %s, not retrained", stage.label, source)
    return saved, origin


def finished_stages(folder: RunFolder, plan: dict[str, Planned]) -> dict[str, dict]:
    """Every stage's checkpoint, if the folder holds a finished run of `plan`: each one there,
    readable, of this format, with the fingerprint the run's config gives (so consuming the
    stages it names). Else a ConfigError naming the missing or unreadable file."""
    out = {}
    for name, planned in plan.items():
        path = folder.checkpoint(name)
        where = path.relative_to(folder.path)
        if not path.is_file():
            raise ConfigError(RUN_DIR, str(folder.path), f"is not a finished run: missing "
                              f"{where} (finish it: saelab resume={folder.path})")
        try:
            saved = read_checkpoint(path)
        except DamagedCheckpoint as exc:
            raise ConfigError(RUN_DIR, str(folder.path), str(exc)) from None
        if other_format(saved):
            raise ConfigError(RUN_DIR, str(folder.path), f"{where} was {other_format(saved)}")
        if saved.get("fingerprint") != planned.fingerprint:
            raise ConfigError(RUN_DIR, str(folder.path), f"{where} was not trained with the "
                              "run's saved config")
        out[name] = saved
    return out
