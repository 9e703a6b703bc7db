"""No code path of the package can run code from received bytes: no pickle (or its relatives), no
``torch.load`` without ``weights_only=True``, no ``eval``/``exec``, no ``allow_pickle=True``, no
``trust_remote_code=True``. An AST scan of every module of the installed packages (so strings
and comments that merely mention these words do not count), plus a token scan for the banned
module names; the scanner itself is tested on planted snippets, so a violation added later fails."""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emulator", "protocol", "client", "cloud", "offsite")
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve", "pickletools"}
CODE_BUILTINS = {"eval", "exec"}


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def scan_source(text: str, name: str = "<source>") -> list[str]:
    """Every unsafe-loading construct in ``text``, as ``name:line: what``."""
    findings = []
    tree = ast.parse(text, filename=name)
    safe_loads = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and any(kw.arg == "weights_only" and _is_true(kw.value) for kw in node.keywords)
    }
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and _dotted(node).endswith("torch.load") and id(node) not in safe_loads:
            findings.append(f"{name}:{line}: {_dotted(node)} used other than as a call with weights_only=True")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    findings.append(f"{name}:{line}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in BANNED_MODULES:
                findings.append(f"{name}:{line}: from {node.module} import ...")
            if module == "torch" and any(alias.name == "load" for alias in node.names):
                findings.append(f"{name}:{line}: from torch import load (hides torch.load from this check)")
            if module == "builtins" and any(alias.name in CODE_BUILTINS for alias in node.names):
                findings.append(f"{name}:{line}: from builtins import eval/exec")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
            first = str(node.args[0].value) if node.args and isinstance(node.args[0], ast.Constant) else ""
            if isinstance(node.func, ast.Name) and node.func.id in CODE_BUILTINS:
                findings.append(f"{name}:{line}: {node.func.id}(...)")
            if func in ("builtins.eval", "builtins.exec"):
                findings.append(f"{name}:{line}: {func}(...)")
            if (func == "__import__" or func.endswith("import_module")) and first.split(".")[0] in BANNED_MODULES:
                findings.append(f"{name}:{line}: {func}({first!r})")
            is_torch_load = func.endswith("torch.load") or func == "torch.serialization.load"
            if is_torch_load and not _is_true(keywords.get("weights_only", ast.Constant(None))):
                findings.append(f"{name}:{line}: {func}(...) without weights_only=True")
            if (
                func.split(".")[-1] == "load"
                and func.split(".")[0] in ("np", "numpy")
                and _is_true(keywords.get("allow_pickle", ast.Constant(None)))
            ):
                findings.append(f"{name}:{line}: {func}(..., allow_pickle=True)")
            if _is_true(keywords.get("trust_remote_code", ast.Constant(None))):
                findings.append(f"{name}:{line}: {func}(..., trust_remote_code=True)")
            if func.split(".")[-1] in ("read_pickle", "to_pickle", "unsafe_load", "full_load"):
                findings.append(f"{name}:{line}: {func}(...)")
            if func.split(".")[-1] == "load" and func.split(".")[0] == "yaml" and "Loader" not in keywords:
                findings.append(f"{name}:{line}: yaml.load without a Loader")
    for token in tokenize.generate_tokens(io.StringIO(text).readline):  # a banned name used as code, however reached
        if token.type == tokenize.NAME and token.string in BANNED_MODULES:
            findings.append(f"{name}:{token.start[0]}: name {token.string!r}")
    return sorted(set(findings))


def package_files() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 20, f"found only {len(files)} modules under {ROOT}"
    return files


def test_package_sources_have_no_unsafe_loading():
    findings = [
        finding for path in package_files() for finding in scan_source(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert findings == []


PLANTED = [
    "import pickle\n",
    "import pickle as p\n",
    "from pickle import loads\n",
    "import dill\n",
    "import joblib\n",
    "import marshal\n",
    "from cloudpickle import loads\n",
    "import torch\nstate = torch.load(path)\n",
    "import torch\nstate = torch.load(path, weights_only=False)\n",
    "import torch\nstate = torch.load(path, map_location='cpu')\n",
    "import torch\nstate = torch.serialization.load(path)\n",
    "from torch import load\n",
    "import torch\nloader = torch.load\n",
    "result = eval(text)\n",
    "exec(code)\n",
    "import builtins\nbuiltins.eval(text)\n",
    "from builtins import exec\n",
    "mod = __import__('pickle')\n",
    "import importlib\nmod = importlib.import_module('pickle')\n",
    "import numpy as np\nvalues = np.load(f, allow_pickle=True)\n",
    "from transformers import AutoModel\nm = AutoModel.from_pretrained(p, trust_remote_code=True)\n",
    "import pandas as pd\nframe = pd.read_pickle(p)\n",
    "import yaml\nvalue = yaml.load(text)\n",
    "def f(x):\n    return x.__reduce__() if x else pickle\n",
]
CLEAN = [
    "model.eval()\n",
    "import torch\nstate = torch.load(path, weights_only=True)\n",
    "import numpy as np\nvalues = np.load(f, allow_pickle=False)\n",
    "import re\npattern = re.compile('x')\n",
    '"""Nothing is ever pickled: no pickle, no eval(), no torch.load()."""\n',
    "# import pickle  (a comment)\n",
    "text = 'exec(code) and import pickle are only words here'\n",
    "import yaml\nvalue = yaml.load(text, Loader=yaml.SafeLoader)\n",
]


@pytest.mark.parametrize("snippet", PLANTED)
def test_scanner_finds_planted_unsafe_code(snippet):
    assert scan_source(snippet), snippet


@pytest.mark.parametrize("snippet", CLEAN)
def test_scanner_leaves_safe_code_alone(snippet):
    assert scan_source(snippet) == [], snippet


def test_scan_would_fail_on_a_planted_module(tmp_path, monkeypatch):
    """The same walk over package files catches a module added with unsafe loading."""
    (tmp_path / "protocol").mkdir()
    for number in range(21):
        (tmp_path / "protocol" / f"ok_{number}.py").write_text("x = 1\n")
    (tmp_path / "protocol" / "incoming.py").write_text("import torch\n\ndef read(p):\n    return torch.load(p)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    findings = [f for path in package_files() for f in scan_source(path.read_text(), path.name)]
    assert findings == [
        "incoming.py:4: torch.load used other than as a call with weights_only=True",
        "incoming.py:4: torch.load(...) without weights_only=True",
    ]
