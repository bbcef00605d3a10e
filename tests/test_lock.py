"""The lock that `make install` installs from agrees with pyproject.toml and stays CPU-clean."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from lock_drift import canonical, drift, locked_versions  # noqa: E402

LOCK = ROOT / "requirements.lock"


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["test"], *extras["hf"]]]


def test_every_declared_dependency_is_locked_inside_its_range():
    pins = locked_versions(LOCK)
    for requirement in _declared():
        name = canonical(requirement.name)
        if name in {"torch", "triton"}:  # installed by the Makefile from their own pins
            assert name not in pins, f"{name} must stay out of the lock (the machine's torch build decides it)"
            continue
        assert name in pins, f"{requirement} is declared in pyproject.toml but not pinned in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
        )


def test_lock_fits_the_installed_torch_and_the_makefile_constraints():
    """Every requirement of this torch build and of the Makefile's LOCK_CONSTRAINTS (what older
    supported torch releases need) is met by the lock's pins. A lock at odds with torch makes pip
    reinstall torch at another version (torch 2.11 requires setuptools<82; a lock pinning
    setuptools 84 turned `make install TORCH_VERSION=2.11.0` into torch 2.14.1)."""
    from importlib.metadata import requires

    pins = locked_versions(LOCK)
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("LOCK_CONSTRAINTS"))
    constraints = [Requirement(r) for r in line.split(":=", 1)[1].split()]
    assert constraints, "Makefile: LOCK_CONSTRAINTS names no requirement"
    torch_needs = [Requirement(r) for r in requires("torch") or []]
    for requirement in constraints + [r for r in torch_needs if r.marker is None or r.marker.evaluate({"extra": ""})]:
        name = canonical(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"requirements.lock pins {name}=={pins[name]}, outside {requirement} (torch or LOCK_CONSTRAINTS)"
            )


def test_lock_holds_no_cuda_packages():
    cuda = [name for name in locked_versions(LOCK) if name.startswith("nvidia-") or name.startswith("cuda-")]
    assert not cuda, f"CUDA packages in requirements.lock (resolve against a CPU torch): {cuda}"


def test_drift_lists_moved_missing_and_new_packages():
    locked = {"transformers": "5.23.0", "einops": "0.8.1", "gone": "1.0"}
    installed = {"transformers": "5.24.0", "einops": "0.8.1", "new-dep": "2.0", "torch": "2.13.0"}
    assert drift(locked, installed) == [
        "  gone: 1.0 -> (not installed)",
        "  new-dep: (not locked) -> 2.0",
        "  transformers: 5.23.0 -> 5.24.0",
    ]
