"""What a complete checkpoint holds, so that a resume can tell a damaged one and fall back to an intact one.

Once every rank has written a checkpoint and voted, rank 0 lists its folder into `<tag>/manifest.json`
(each file's size) before moving the pointer. A checkpoint whose files have since gone missing or changed
size (a truncated copy, a half-synced transfer, a clean-up that went too far) is damaged: a resume then takes
the newest earlier checkpoint that has a manifest and still matches it, and says so. Sizes catch missing and
truncated files, not flipped bits. Checkpoints saved before manifests existed are trusted as they are.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

from megamu.fileio import atomic_write

MANIFEST = "manifest.json"
_TAG = re.compile(r"global_step(\d+)$")  # pointer.tag_for's tags: not diverged or universal ones


def _files(folder: str) -> dict[str, int]:
    """Relative path → size of every file under `folder` but the manifest."""
    sizes = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != MANIFEST:
                sizes[relative] = os.path.getsize(path)
    return sizes


def write_manifest(ckpt_dir: str, tag: str) -> None:
    """Rank 0, after every rank has written `tag`: record its files."""
    folder = os.path.join(ckpt_dir, tag)
    files = _files(folder)  # before atomic_write's temporary file joins them
    with atomic_write(os.path.join(folder, MANIFEST)) as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)


def drop_manifest(ckpt_dir: str, tag: str) -> None:
    """Before `tag` is saved again: until the new save is complete, it is not the old one either."""
    path = os.path.join(ckpt_dir, tag, MANIFEST)
    if os.path.exists(path):
        os.remove(path)


def damage(ckpt_dir: str, tag: str) -> Optional[str]:
    """What is wrong with checkpoint `tag` against its manifest, or None when it matches (or has no manifest
    and so cannot be checked, as its folder exists)."""
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        return f"its folder {folder} is missing"
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path} is unreadable ({err})"
    found = _files(folder)
    problems = []
    for name, size in sorted(expected.items()):
        if name not in found:
            problems.append(f"{name} is missing")
        elif found[name] != size:
            problems.append(f"{name} has {found[name]} bytes, not the {size} saved")
    return "; ".join(problems) or None


def _step(tag: str) -> int:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else -1


def earlier_complete_tags(ckpt_dir: str, tag: str) -> list[str]:
    """The checkpoints older than `tag` that were complete when saved (they have a manifest), newest first."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    tags = [name for name in names
            if _TAG.match(name) and os.path.isfile(os.path.join(ckpt_dir, name, MANIFEST))]
    return sorted((t for t in tags if _step(t) < _step(tag)), key=_step, reverse=True)


def intact_tag(ckpt_dir: str, tag: str) -> tuple[Optional[str], Optional[str]]:
    """(the checkpoint to resume, what to say about it): `tag` itself when intact, else the newest intact
    earlier complete one with a warning, else (None, why none is usable)."""
    what = damage(ckpt_dir, tag)
    if what is None:
        return tag, None
    where = f"checkpoint {tag} in {ckpt_dir} is damaged ({what})"
    for earlier in earlier_complete_tags(ckpt_dir, tag):
        if damage(ckpt_dir, earlier) is None:
            return earlier, (f"{where}; resuming from {earlier}, the newest intact checkpoint before it (the "
                             f"damaged one is left for inspection and is overwritten when the run saves that step)")
    return None, (f"{where}, and no earlier complete checkpoint is intact; restore the files, or start afresh in "
                  f"another train.out_dir")
