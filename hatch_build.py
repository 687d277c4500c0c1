"""The wheel's build hook: the per-request modules compiled with mypyc when it can.

`python -m proxy.build` compiles them beside their sources (a C compiler and Python's
headers needed); the wheel then carries the extensions and the build record
(proxy/_compiled.json) and is tagged for this platform. Without a compiler the wheel is
pure Python and works the same, slower. An editable install is left to `make`, which
compiles in place (and again whenever a source changes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CompiledBuildHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        root = Path(self.root)
        done = subprocess.run([sys.executable, "-m", "proxy.build"], cwd=root, check=False)
        if done.returncode != 0 or not (root / "proxy" / "_compiled.json").exists():
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        built = sorted(p.relative_to(root).as_posix() for p in (root / "proxy").rglob("*.so"))
        build_data["artifacts"].extend([*built, "proxy/_compiled.json"])
