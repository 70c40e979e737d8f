"""What every benchmark does last: write its results as JSON with the command that made them."""
from __future__ import annotations

import json
import os
import sys


def write_json(path: str, script: str, argv, **payload) -> None:
    """Writes {"command": "python <script> <args>", **payload} to `path` (dirs made).
    `argv`: the arguments main() was given, None for the command line's."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = " ".join(["python", os.path.relpath(os.path.abspath(script), os.getcwd())]
                       + (sys.argv[1:] if argv is None else list(argv)))
    with open(path, "w") as f:
        json.dump(dict(command=command, **payload), f, indent=2)
