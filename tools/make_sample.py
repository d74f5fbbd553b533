"""Build the bundled CIFAR-10 sample (class-balanced train/test subsets) from a full copy.

Usage: python tools/make_sample.py ../shared/data/cifar10 mae/assets/cifar10_sample
"""

import sys
from collections import Counter
from pathlib import Path

from datasets import load_dataset

PER_CLASS = {"train": 300, "test": 100}


def main(src: str, dst: str) -> None:
    files = {split: f"{src}/{split}-*.parquet" for split in PER_CLASS}
    ds = load_dataset("parquet", data_files=files)
    Path(dst).mkdir(parents=True, exist_ok=True)
    for split, per_class in PER_CLASS.items():
        labels = ds[split]["label"]
        taken, keep = Counter(), []
        for i, y in enumerate(labels):  # rows are already shuffled: take the first per class
            if taken[y] < per_class:
                taken[y] += 1
                keep.append(i)
        ds[split].select(keep).to_parquet(f"{dst}/{split}-00000-of-00001.parquet")
        print(split, len(keep), dict(sorted(taken.items())))


if __name__ == "__main__":
    main(*sys.argv[1:3])
