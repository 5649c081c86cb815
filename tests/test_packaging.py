"""The distribution maps every package folder of the repository, so a plain install has them all."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = {"linvision": "linvision", "kernels": "linvision.kernels", "train": "linvision.train", "configs": "linvision.configs",
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
