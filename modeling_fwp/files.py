"""Writing folders so that a reader (or a later run) never finds half of one: everything is written into a temporary
folder beside the target, on the same filesystem, and renamed into place when complete. Used by scripts/publish.py
(the Hub-ready folder), scripts/train.py (the final model), convert_fla and the tokenizer cache. Not imported by the
model code.

What is put in place gets the modes the umask gives any new file (0644 / 0755 under umask 022): not the private
0700 of `tempfile.mkdtemp`'s folder, nor the 0600 that safetensors (0.8) gives the weights it writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .safeguards import give_umask_modes


def temporary_sibling(target: Path, purpose: str) -> Path:
    """A new empty hidden folder `.<name>.<purpose>-XXXX` beside target (its parent must exist), with the mode the
    umask gives a new folder (mkdtemp makes it private)."""
    target = Path(target)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{purpose}-", dir=target.parent))
    give_umask_modes(folder)
    return folder


def install_folder(tmp: Path, target: Path) -> None:
    """Puts the finished folder tmp at target. A replaced folder is moved aside first and restored on failure, so
    target always holds either the old folder or the complete new one. tmp and everything in it get the umask's
    modes first."""
    tmp, target = Path(tmp), Path(target)
    give_umask_modes(tmp)
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, aside / "old")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside / "old", target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def move_files_into(staging: Path, target: Path, commit: str, stale: Iterable[str] = ()) -> None:
    """Moves the complete files of `staging` into the existing folder `target` (which holds other things that stay,
    e.g. checkpoints), replacing files of the same name, then removes the empty staging folder.

    `commit` is the file whose presence says "a complete set is here" (config.json for a saved model): target's old
    one is removed first and staging's moved in last, so a reader finds either the old complete set, no `commit`
    file at all, or the new complete set, never a `commit` file beside files of another save. `stale` names files of
    target that belong to the old set but not the new one (e.g. weight shards); they are removed as well. What is
    moved gets the umask's modes first.
    """
    staging, target = Path(staging), Path(target)
    give_umask_modes(staging)
    names = sorted(p.name for p in staging.iterdir())
    (target / commit).unlink(missing_ok=True)
    for name in stale:
        if name not in names and name != commit:
            path = target / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    for name in [n for n in names if n != commit] + [n for n in names if n == commit]:
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staging / name, destination)
    staging.rmdir()


__all__ = ["give_umask_modes", "install_folder", "move_files_into", "temporary_sibling"]
