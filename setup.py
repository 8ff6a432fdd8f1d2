"""Only for package data that lives outside the package (everything else is in pyproject.toml).

`targets/*.yaml` and `profiles/calibration/*.jsonl` stay at the top of the repository, where users read and
edit them; a wheel build copies them into `edgekd/_data/` so that a non-editable install finds them
(edgekd/resources.py). No copy is committed: the top-level folders are the one source of truth.
"""
import ast
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _data_folders() -> dict:
    """DATA_FOLDERS from edgekd/resources.py, read without importing edgekd (its dependencies may be absent)."""
    tree = ast.parse((ROOT / "edgekd" / "resources.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DATA_FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("edgekd/resources.py defines no DATA_FOLDERS")


class build_py_with_data(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders
        for name, (folder, pattern) in _data_folders().items():
            files = sorted((ROOT / folder).glob(pattern))
            if not files:
                raise RuntimeError(f"no {pattern} in {ROOT / folder}: edgekd's package data is missing")
            dest = Path(self.build_lib) / "edgekd" / "_data" / name
            self.mkpath(str(dest))
            for f in files:
                self.copy_file(str(f), str(dest / f.name))


setup(cmdclass={"build_py": build_py_with_data})
