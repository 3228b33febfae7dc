"""Print pyproject.toml's dependencies, plus those of the extras named in argv, one per line (for pip -r).

The image installs its dependencies from this list in a layer of their own, before the source is copied, so
that a code change does not reinstall them. Extras that name ``sora[...]`` are expanded.

    python deploy/requirements.py            # the serving install
    python deploy/requirements.py train      # + the training stack
"""

import sys
import tomllib
from pathlib import Path


def requirements(extras: list[str], pyproject: Path = Path("pyproject.toml")) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    out, todo, seen = list(project["dependencies"]), [e for e in extras if e], set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in project["optional-dependencies"][extra]:
            if req.startswith(f"{project['name']}["):
                todo += req[len(project["name"]) + 1 : -1].split(",")
            else:
                out.append(req)
    return list(dict.fromkeys(out))


if __name__ == "__main__":
    print(*requirements([e for arg in sys.argv[1:] for e in arg.split(",")]), sep="\n")
