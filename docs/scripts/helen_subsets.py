"""Nested subsets of HELEN's training identities, for a curve of accuracy against the number of in-the-wild faces.

An experiment script (session 13, docs/experiments.md), not part of the package. Each subset keeps every validation
identity of the full set (the same faces `jobs.train` holds out of it, once) and a share of its training identities,
chosen by a hash of the person that does not depend on the split's (so a quarter is inside the half). The training
faces are linked into as many copy folders as make an epoch of the subset about as long as the full set's:
`read_ibug` searches folders recursively and a copy keeps its file name, so it keeps its person and its side of the
split. Every subset is named `helen` inside its own folder, so `jobs.train` splits it with the same salt:

    python docs/scripts/helen_subsets.py --out /tmp/subsets [--helen ../shared/data/300w/helen] [--shares 0.125,0.25,0.5]
    python -m jobs.train ... --data ibug:/tmp/subsets/share250/helen ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fkp_core.dataset import Record, hash_unit, read_ibug, split_by_identity


def share_of(person: str) -> float:
    """A person's place in [0, 1): a subset of share s keeps the training identities below s."""
    return hash_unit(f"subset:{person}")


def link(record: Record, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in (Path(record.origin), record.image_path):
        target = folder / path.name
        if not target.exists():
            target.symlink_to(path.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the subsets (one sub-folder each)")
    parser.add_argument("--helen", type=Path, default=Path("../shared/data/300w/helen"), help="HELEN's .pts folder")
    parser.add_argument("--shares", default="0.125,0.25,0.5", help="comma-separated shares of the training identities")
    args = parser.parse_args()
    train, val = split_by_identity(read_ibug(args.helen, source="helen"))
    print(f"helen: {len(train)} training faces, {len(val)} validation faces")
    for share in (float(s) for s in args.shares.split(",")):
        root = args.out / f"share{round(share * 1000):03d}" / "helen"
        copies = round(1 / share)
        for record in val:
            link(record, root / "c0")
        for record in (r for r in train if share_of(r.person) < share):
            for c in range(copies):
                link(record, root / f"c{c}")
        sub_train, sub_val = split_by_identity(read_ibug(root, source="helen"))
        assert sorted(r.image_path.name for r in sub_val) == sorted(r.image_path.name for r in val)
        distinct = len({r.image_path.name for r in sub_train})
        print(f"{root}: {distinct} training faces x {copies} = {len(sub_train)} per epoch, {len(sub_val)} validation")


if __name__ == "__main__":
    main()
