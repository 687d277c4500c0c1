"""The README and docs/ say only what is true of the code: every `tether` command and flag
they name exists (and its `--help` parses), every `make` target exists, every path they
name is in the repository, every route of the control plane is in docs/api.md, and
nothing points at files outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from controlplane.server import ControlPlane, ControlPlaneSpec, RegistryAddress
from tether.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Registry KV keys the docs name, not files.
KV_PREFIXES = ("tether/v1/", "tether/push/", "tether/ca/")
# Sections that name what is not built yet, on purpose.
FORWARD_SECTIONS = ("## Where we are heading", "## Not yet")


def current_text(path: Path) -> str:
    text = path.read_text()
    for heading in FORWARD_SECTIONS:
        start = text.find(heading + "\n")
        if start >= 0:
            end = text.find("\n## ", start + len(heading))
            text = text[:start] + (text[end:] if end >= 0 else "")
    return text


def code_spans(text: str) -> list[str]:
    """Fenced blocks (with backslash and `#`-comment continuation lines joined onto the
    line they continue) and inline `code`."""
    spans: list[str] = []
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    for block in blocks:
        joined: list[str] = []
        for line in block.splitlines():
            if joined and (joined[-1].endswith("\\") or re.match(r"\s+#", line)):
                joined[-1] = joined[-1].rstrip("\\") + " " + line.strip().lstrip("#")
            else:
                joined.append(line)
        spans += joined
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    spans += re.findall(r"`([^`\n]+)`", prose)
    return spans


def tether_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of every `tether SUB ...` the document shows."""
    found = []
    for span in code_spans(current_text(path)):
        for m in re.finditer(r"(?<![\w/.-])tether ([a-z][a-z-]*(?: [a-z][a-z-]*)?)(.*)", span):
            rest = re.split(r"(?<![\w/.-])tether [a-z]", m.group(2))[0]
            rest = re.split(r"[|;&>]", rest)[0]  # its flags end at a shell operator
            flags = re.findall(r"(?<![\w=.-])(--?[a-zA-Z][\w-]*)", rest)
            found.append((m.group(1), flags))
    return found


def options_of(command: click.Command) -> set[str]:
    opts = {"--help", "-h"}
    for p in command.params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return opts


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_tether_command_and_flag_named_exists(doc: Path) -> None:
    assert isinstance(main, click.Group)
    commands = tether_commands(doc)
    if doc.name == "README.md":
        assert len(commands) > 20  # the parsing above does find them
    runner = CliRunner()
    for words, flags in commands:
        sub, _, subsub = words.partition(" ")
        command = main.commands.get(sub)
        assert command is not None, f"{doc.name}: `tether {sub}` does not exist"
        args = [sub]
        if isinstance(command, click.Group):  # `tether token create`, `tether rollout restart`
            assert subsub in command.commands, f"{doc.name}: `tether {words}` does not exist"
            command = command.commands[subsub]
            args.append(subsub)
        unknown = [f for f in flags if f not in options_of(command)]
        assert not unknown, f"{doc.name}: `tether {words}` has no {unknown}"
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output


def test_every_make_target_named_exists() -> None:
    targets = set(re.findall(r"^([\w./-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = set()
    for doc in DOCS:
        for span in code_spans(current_text(doc)):
            named.update(re.findall(r"(?<![\w-])make ([a-z][\w-]*)", span))
    assert {"up", "test"} <= named
    assert named <= targets, named - targets


def test_every_repository_path_named_exists() -> None:
    tops = ("tether/", "proxy/", "registry/", "controlplane/", "docs/", "tests/", "bench/")
    missing = []
    for doc in DOCS:
        for span in code_spans(current_text(doc)):
            for word in span.split():
                word = word.strip("`'\",;:()[]")
                if "<" in word or word.startswith(KV_PREFIXES):
                    continue  # registry KV keys, placeholders
                if word.startswith(tops) or word in ("Makefile", "Dockerfile"):
                    # file.py:123 (a line), tests/x.py::test (a test): the file
                    path = re.sub(r"(::.*|:\d+.*)$", "", word).rstrip("/")
                    ok = any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()
                    if not ok:
                        missing.append(f"{doc.name}: {word}")
    assert not missing, missing


def test_docs_do_not_point_outside_the_repository() -> None:
    for doc in [*DOCS, ROOT / "pyproject.toml"]:
        text = doc.read_text()
        assert "shared/" not in text and "DESIGN.md" not in text, doc.name


def test_every_control_plane_route_is_in_the_api_doc() -> None:
    cp = ControlPlane(ControlPlaneSpec(registry=RegistryAddress()))
    api = (ROOT / "docs" / "api.md").read_text()
    paths = {r.resource.canonical for r in cp.app.router.routes() if r.resource is not None}
    assert "/api/v1/sidecars" in paths and "/api/v1/push" in paths
    for path in sorted(paths):
        # `{name}` as aiohttp writes a placeholder, or `<name>` as prose does
        forms = (path, re.sub(r"\{(\w+)\}", r"<\1>", path))
        assert any(f"{p}{end}" in api for p in forms for end in "`[?"), path
