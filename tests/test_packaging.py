"""The distribution maps every package folder of the repository, so a plain install has them all."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"linvision": "linvision", "linvision_kernels": "linvision.kernels", "train": "linvision.train", "configs": "linvision.configs",
           "sample": "linvision.sample", "demo": "linvision.demo", "benchmarks": "linvision.benchmarks"}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"pyproject packages differ from the folders: missing {found - listed}, extra {listed - found}"


def test_no_package_folder_shadows_an_installed_distribution():
    """Running from a clone puts the repository root first on ``sys.path`` (``python -m pytest``, ``python -m
    linvision...``), so a folder named like another distribution's top-level package would hide it: a folder
    ``kernels/`` once hid the ``kernels`` package that transformers imports, and diffusers failed to import."""
    from importlib.metadata import packages_distributions

    owners = packages_distributions()
    clashes = {folder: owners[folder] for folder in FOLDERS if folder in owners and set(owners[folder]) != {"linvision"}}
    assert not clashes, f"repository folders named like installed packages: {clashes}"
