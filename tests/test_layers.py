"""The library imports no job: every module of ``linvision`` (minus the jobs) and of ``linvision.kernels``
imports with the job packages blocked.

Data flows one way (DESIGN.md): a job reads a config and builds from the library, never the reverse. The
jobs are ``linvision.train``, ``linvision.sample`` and ``linvision.demo`` (the repository folders train/,
sample/ and demo/); the command line (``linvision.cli``) imports a job only inside its subcommand.
"""
import os
import subprocess
import sys
import textwrap

JOBS = ("linvision.train", "linvision.sample", "linvision.demo")
LIBRARY = ("linvision", "linvision.kernels")

# argv: the packages (or modules) to import, each with everything below it; jobs are never imported
SCRIPT = textwrap.dedent(
    f"""
    import importlib, importlib.abc, pkgutil, sys

    JOBS = {JOBS!r}

    def is_job(name):
        return any(name == j or name.startswith(j + ".") for j in JOBS)

    class BlockJobs(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if is_job(name):
                raise ImportError(f"job module {{name}} imported by the library")
            return None

    sys.meta_path.insert(0, BlockJobs())
    def load(name):
        try:
            return importlib.import_module(name)
        except ImportError as err:
            failed.append(f"{{name}}: {{err}}")

    names, failed = [], []
    for root in sys.argv[1:]:
        names.append(root)
        package = load(root)
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), root + "."):
            if not is_job(info.name) and not info.name.endswith(".__main__"):  # __main__ runs the command
                names.append(info.name)
                load(info.name)
    print("\\n".join(failed) or "imported " + " ".join(names))
    sys.exit(1 if failed else 0)
    """
)


def _import_all(*roots, env=None):
    return subprocess.run([sys.executable, "-c", SCRIPT, *roots], capture_output=True, text=True, timeout=600,
                          env=env)


def test_library_imports_no_job_module():
    result = _import_all(*LIBRARY)
    assert result.returncode == 0, result.stdout + result.stderr
    imported = set(result.stdout.split()[1:])
    # the walk reached every layer of the library
    assert {"linvision.cli", "linvision.mixers.lit", "linvision.models.dit", "linvision.diffusers.joint",
            "linvision.distill.loss", "linvision.kernels.linear_attn.naive"} <= imported


def test_a_library_module_that_imports_a_job_fails(tmp_path):
    (tmp_path / "leaky_module.py").write_text("from linvision.train.config import load_config\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = _import_all("leaky_module", env=env)
    assert result.returncode == 1
    assert "job module linvision.train imported by the library" in result.stdout
