"""Dependencies: every one has a floor in pyproject.toml, and constraints.txt pins the whole tested environment."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
OWN = canonicalize_name(PROJECT["name"])
DECLARED = [  # every group; `lm-pipelines[hf,onnx]` in dev refers to the extras, declared in their own groups
    req
    for req in map(Requirement, PROJECT["dependencies"] + [r for group in EXTRAS.values() for r in group])
    if canonicalize_name(req.name) != OWN
]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        [spec] = req.specifier
        assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(spec.version)
    return pins


def test_every_dependency_has_a_floor():
    missing = [str(r) for r in DECLARED if not any(s.operator in (">=", "==", "~=") for s in r.specifier)]
    assert not missing, f"dependencies without a lower bound in pyproject.toml: {missing}"


def test_constraints_pin_every_dependency_within_its_range():
    pins = _pins()
    for req in DECLARED:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req}"


def test_torch_is_the_cpu_build_and_nothing_pulls_cuda():
    pins = _pins()
    assert pins["torch"] == Version("2.13.0")
    assert not [n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton"]


def test_the_advisory_floors_of_the_reliability_list_hold():
    floors = {canonicalize_name(r.name): r.specifier for r in DECLARED}
    for name, oldest_safe in {"mlflow": "3.11.1", "prefect": "3.6.22", "torch": "2.6", "pyyaml": "5.4"}.items():
        floor = max(Version(s.version) for s in floors[name] if s.operator == ">=")
        assert floor >= Version(oldest_safe), f"{name}>={floor} admits versions with known advisories"


def test_the_dev_extra_brings_every_other_extra_so_the_tests_cover_them():
    own = [Requirement(r) for r in EXTRAS["dev"] if canonicalize_name(Requirement(r).name) == OWN]
    assert own and set().union(*(r.extras for r in own)) == set(EXTRAS) - {"dev"}
