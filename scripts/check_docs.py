# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Checks that what the documentation quotes still matches the code.

    python scripts/check_docs.py [FILE ...]    # default: README.md, CHANGELOG.md, docs/**/*.md

- every `mergekit-moe2dense` command quoted (code blocks and inline code) names a real
  subcommand and only flags that subcommand accepts (`mergekit-yaml`: mergekit's flags);
- every `python benchmarks/X.py` / `bash scripts/X.sh` quoted exists and takes the flags shown;
- every repository path quoted exists (`tests/test_x.py::test_y`: that test exists), and every
  `configs/*.yml` named parses as a config of a known method with known parameters;
- every YAML block with a `merge_method` parses the same way;
- no text refers to work items by number or tells the history of the work.

Prints one line per problem (FILE:LINE: what) and exits 1 if there is any.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROOTS = ("benchmarks", "configs", "docs", "mergekit_moe2dense", "plugin", "scripts", "tests", "upstream")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(ROOTS)})/[\w./*-]*[\w*])(?:::(\w+))?")
HISTORY = re.compile(r"\bissues?\s+#?\d+|\bsessions?\b", re.IGNORECASE)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
FLAG = re.compile(r"(?<![\w./-])(--?[A-Za-z][\w-]*)")
CLI = re.compile(r"(?:\bmergekit-moe2dense|(?<![\w-])-m mergekit_moe2dense)\b(?!\.)\)?(.*)")
MERGEKIT_YAML = re.compile(r"\bmergekit-yaml\b(.*)")
SCRIPT = re.compile(r"\b(?:python|bash)\s+((?:benchmarks|scripts)/[\w.-]+\.(?:py|sh))\b(.*)")


@dataclass
class Snippet:
    """A piece of quoted text: a code block or an inline code span, and where it starts."""

    text: str
    line: int
    language: str = ""


def default_files() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


def snippets(text: str) -> list[Snippet]:
    """Code blocks (continuation lines joined) and inline code spans (line breaks as spaces)."""
    found = []
    for block in FENCE.finditer(text):
        body = block.group(2).replace("\\\n", " ")
        found.append(Snippet(body, text.count("\n", 0, block.start()) + 2, block.group(1)))
    # blank the blocks out, keeping line numbers, so their backticks do not pair with the prose's
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        found.append(Snippet(span.group(1).replace("\n", " "), prose.count("\n", 0, span.start()) + 1))
    return found


def command_lines(snippet: Snippet) -> list[str]:
    lines = []
    for line in snippet.text.splitlines():
        line = re.split(r"\s#\s|\s#$|&&|;", line)[0]  # a shell comment, or the next command
        lines.append(line)
    return lines


class Checker:
    def __init__(self):
        self.problems: list[str] = []
        self.counts = {"commands": 0, "paths": 0, "configs": 0}
        self._cli_flags: dict[str, set[str]] | None = None
        self._yaml_flags: set[str] | None = None

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- what the code accepts ---------------------------------------------------------------
    @property
    def cli_flags(self) -> dict[str, set[str]]:
        """Subcommand -> the flags it accepts ("" : the group's own)."""
        if self._cli_flags is None:
            import click

            from mergekit_moe2dense.cli import main

            context = click.Context(main)
            self._cli_flags = {"": {"-h", "--help"}}
            for name in main.list_commands(context):
                self._cli_flags[name] = {"-h", "--help"} | flags_of(main.get_command(context, name))
        return self._cli_flags

    @property
    def mergekit_yaml_flags(self) -> set[str]:
        if self._yaml_flags is None:
            from mergekit.scripts.run_yaml import main

            self._yaml_flags = {"-h", "--help"} | flags_of(main)
        return self._yaml_flags

    # -- the checks ----------------------------------------------------------------------------
    def check_file(self, path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        for number, line in enumerate(text.splitlines(), 1):
            for match in HISTORY.finditer(line):
                self.problem(f"{name}:{number}", f"{match.group(0)!r}: say what the project does, not how it was made")
            for match in REPO_PATH.finditer(line):
                self.check_path(f"{name}:{number}", match.group(1), match.group(2))
        for snippet in snippets(text):
            where = f"{name}:{snippet.line}"
            if snippet.language in ("yaml", "yml") and "merge_method:" in snippet.text:
                self.check_config(where, snippet.text, "the YAML block")
            for line in command_lines(snippet):
                self.check_command(where, line)

    def check_path(self, where: str, relative: str, test_name: str | None) -> None:
        self.counts["paths"] += 1
        matches = list(REPO.glob(relative)) if "*" in relative else [REPO / relative]
        if not any(m.exists() for m in matches):
            self.problem(where, f"{relative} does not exist")
            return
        if test_name and not re.search(rf"^\s*def {test_name}\(", matches[0].read_text(encoding="utf-8"), re.M):
            self.problem(where, f"{relative} has no test {test_name}")
        if relative.startswith("configs/") and relative.endswith((".yml", ".yaml")) and "*" not in relative:
            self.check_config(where, matches[0].read_text(encoding="utf-8"), relative)

    def check_config(self, where: str, text: str, source: str) -> None:
        import pydantic

        from mergekit_moe2dense.config import Moe2DenseConfig
        from mergekit_moe2dense.errors import Moe2DenseError
        from mergekit_moe2dense.methods import METHODS

        self.counts["configs"] += 1
        try:
            config = Moe2DenseConfig.from_yaml(text, source=source)
        except Moe2DenseError as error:
            self.problem(where, str(error))
            return
        method = METHODS.get(config.merge_method)
        if method is None:
            self.problem(where, f"{source}: unknown merge_method {config.merge_method!r}")
            return
        parameters = config.method_parameters
        unknown = sorted(set(parameters) - set(method.Parameters.model_fields))
        if unknown:
            self.problem(where, f"{source}: {config.merge_method} has no parameter(s) {', '.join(unknown)}")
            return
        try:
            method.Parameters.model_validate(parameters)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            name = ".".join(str(part) for part in first["loc"])
            self.problem(where, f"{source}: {config.merge_method} parameter {name}: {first['msg']}")

    def check_command(self, where: str, line: str) -> None:
        if match := CLI.search(line):
            self.counts["commands"] += 1
            words = match.group(1).split()
            command = "" if not words or words[0].startswith("-") else words[0]
            if command not in self.cli_flags:
                command = "merge"  # `mergekit-moe2dense CONFIG OUT`
            self.check_flags(where, f"mergekit-moe2dense {command}".strip(), match.group(1), self.cli_flags[command])
        elif match := MERGEKIT_YAML.search(line):
            self.counts["commands"] += 1
            self.check_flags(where, "mergekit-yaml", match.group(1), self.mergekit_yaml_flags)
        for match in SCRIPT.finditer(line):
            self.counts["commands"] += 1
            script = REPO / match.group(1)
            if not script.is_file():
                continue  # the path check reports it
            source = script.read_text(encoding="utf-8")
            # argparse declares a flag as a string literal; a shell script tests for the word
            quoted = script.suffix == ".py"
            accepted = {flag for flag in set(FLAG.findall(match.group(2))) if declares(source, flag, quoted)}
            self.check_flags(where, match.group(1), match.group(2), accepted | {"-h", "--help"})

    def check_flags(self, where: str, command: str, arguments: str, accepted: set[str]) -> None:
        arguments = re.split(r"\|\s*(?:tee|grep|head|tail)\b", arguments)[0]  # a pipe to another tool
        for flag in FLAG.findall(arguments):
            if flag not in accepted:
                self.problem(where, f"`{command}` has no option {flag}")


def flags_of(command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("-")}


def declares(source: str, flag: str, quoted: bool) -> bool:
    if quoted:
        return re.search(rf"[\"']{re.escape(flag)}[\"'=]", source) is not None
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", source) is not None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    files = [Path(arg).resolve() for arg in argv] or default_files()
    checker = Checker()
    for path in files:
        if path.is_file():
            checker.check_file(path)
        else:
            checker.problem(str(path), "no such file")
    for problem in checker.problems:
        print(problem)
    counts = ", ".join(f"{n} {what}" for what, n in checker.counts.items())
    status = f"{len(checker.problems)} problem(s)" if checker.problems else "ok"
    print(f"docs check: {len(files)} files, {counts}: {status}")
    return 1 if checker.problems else 0


if __name__ == "__main__":
    sys.exit(main())
