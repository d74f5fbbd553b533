"""Print the installed version of every dependency pyproject.toml names (its extras included),
and of numpy and huggingface_hub: ``python .ci/versions.py LABEL``."""

import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
extras = [r for extra in project["optional-dependencies"].values() for r in extra]
names = [re.match(r"[A-Za-z0-9._-]+", r)[0] for r in project["dependencies"] + extras]


def shown(name: str) -> str:
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:  # an extra that .[dev] does not install (e.g. dali)
        return f"{name} (an extra, not installed)"


print(
    f"{sys.argv[1]}:",
    ", ".join(shown(n) for n in dict.fromkeys(names + ["numpy", "huggingface_hub"])),
)
