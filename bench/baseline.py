"""The build `--baseline REF` benches beside this tree: REF's gateway package exported into the results folder.

`git archive` writes the files and registers nothing in the repository (no worktree to prune if a run is
killed); the folder is removed when the run ends. The baseline runs with the same interpreter and
dependencies as this tree, its package first on PYTHONPATH.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Checkout:
    """REF's gateway package on disk."""

    ref: str
    commit: str
    path: Path            # holds gateway/, so PYTHONPATH=path imports REF's gateway

    @property
    def label(self) -> str:
        """'REF (commit)' for the summary."""
        return f"{self.ref} ({self.commit[:10]})"


def resolve(repo: Path, ref: str) -> str:
    """The commit `ref` names in `repo`; a branch a clone only has as origin/<ref> (e.g. main) counts too."""
    for candidate in (ref, f"origin/{ref}"):
        done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"],
                              capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout.strip()
    raise ValueError(f"--baseline {ref}: no such commit, branch or tag in {repo}")


def check_out(repo: Path, ref: str, directory: Path) -> Checkout:
    """Export the gateway package of `ref` into `directory` (which must not exist yet)."""
    commit = resolve(repo, ref)
    directory.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit, "gateway"],
                             capture_output=True, check=True, timeout=60)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True, timeout=60)
    return Checkout(ref, commit, directory)


def remove(checkout: Checkout) -> None:
    """Delete the exported files."""
    shutil.rmtree(checkout.path, ignore_errors=True)


def imported_from(python: str, env: dict[str, str], cwd: Path) -> Path:
    """The folder `python` imports the gateway package from under `env` (to prove which build runs)."""
    done = subprocess.run([python, "-c", "import gateway, pathlib; print(pathlib.Path(gateway.__file__).parent.parent)"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"cannot import gateway: {done.stderr[-500:]}")
    return Path(done.stdout.strip()).resolve()


def describe(repo: Path) -> str:
    """This tree's commit, marked when files differ from it."""
    done = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty=+uncommitted", "--abbrev=10"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"
