"""Chat on a fresh install: `brownout-jax serve` in an environment holding only what
`pip install -e .` would install (the closure of pyproject's [project].dependencies) serves a
chat request against the bundled demo.

The test environment has the dev extras too, and they pull in packages a fresh install lacks
(torch brings jinja2, which transformers needs to render a chat template and does not require):
that is how /v1/chat/completions once failed on every fresh install while every test passed.
A real fresh venv (`pip install -e .`) costs about 3.5 minutes on 2 cores, the C++ kernels'
build included, so this test builds its equivalent from what is installed: a venv without
pip whose site-packages holds links to exactly the files of the declared closure's
distributions. Anything else is absent there for imports and importlib.metadata alike, as on
a fresh install, so an undeclared package the server needs fails this test."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The installed distributions only: a build's brownout_jax.egg-info in the source tree (on
# sys.path under pytest) describes the source files, not what the install put in place.
SITE = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})


def installed(name: str) -> metadata.Distribution:
    found = next(iter(metadata.distributions(name=name, path=SITE)), None)
    if found is None:
        pytest.fail(f"{name} is declared (or required) but not installed here")
    return found


def declared_closure() -> dict[str, metadata.Distribution]:
    """The distributions `pip install -e .` installs: the project, its declared dependencies
    and theirs, markers evaluated here (no extras unless a requirement asks for them)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    closure = {canonicalize_name(project["name"]): installed(project["name"])}
    pending = [Requirement(line) for line in project["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        dist = closure.get(name) or installed(requirement.name)
        closure[name] = dist
        for line in dist.requires or ():
            nested = Requirement(line)
            extras = ["", *sorted(requirement.extras)]
            if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in extras):
                nested.marker = None
                pending.append(nested)
    return closure


def build_fresh_env(directory: Path, closure: dict[str, metadata.Distribution]) -> Path:
    """A venv whose site-packages links each file of ``closure`` (from their RECORDs); its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    purelib = sysconfig.get_path("purelib", vars={"base": str(directory)})
    site = Path(purelib)
    for name, dist in closure.items():
        files = dist.files
        assert files is not None, f"{name} lists no files (no RECORD): cannot mirror it"
        for file in files:
            if file.parts[0] == "..":  # scripts in bin/: the test runs python -m
                continue
            source = Path(dist.locate_file(file))
            target = site / file
            if not source.exists() or target.exists() or target.is_symlink():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    return directory / "bin" / "python"


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    return build_fresh_env(tmp_path_factory.mktemp("fresh") / "venv", declared_closure())


def test_the_environment_is_a_fresh_install(fresh_python):
    """torch (dev extras) is absent; what chat templates need is present: declared."""
    check = (
        "import importlib.util, importlib.metadata as m;"
        "print(importlib.util.find_spec('torch') is None, importlib.util.find_spec('jinja2')"
        " is not None, [d.metadata['Name'] for d in m.distributions()"
        " if d.metadata['Name'].lower() in ('torch', 'pytest', 'openai')])"
    )
    result = subprocess.run(
        [str(fresh_python), "-I", "-c", check], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().split(maxsplit=2) == ["True", "True", "[]"]


def test_a_fresh_install_serves_chat_on_the_demo(fresh_python, start_server):
    proc = start_server(None, "--no-grpc", python=(str(fresh_python), "-I"))
    try:
        body = {
            "messages": [{"role": "user", "content": "What does os.path.join do?"}],
            "max_tokens": 8,
            "temperature": 0,
        }
        request = urllib.request.Request(
            f"{proc.http}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as err:
            pytest.fail(f"chat on a fresh install: {err.code} {err.read().decode()}")
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
        assert "apply_chat_template requires" not in proc.output
    finally:
        assert proc.stop() == 0
