"""No code from files runs: weights from safetensors or hash-verified files, `weights_only=True` loads, YAML read
safely, paths used as paths. A scan of the source keeps it that way."""

import ast
from pathlib import Path

import pytest
import torch

from chimle import weights
from chimle.checkpoint import CorruptCheckpointError, load_state
from chimle.cli import main
from chimle.config import ConfigError, resolve
from chimle.convert import convert_file

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("src/chimle", "scripts", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]

# torch.jit.load runs TorchScript: only on the FID network, read from the package fetched by pinned sha256.
ALLOWED = {("metrics/inception.py", "state_from_torchscript", "torch.jit.load")}


def _name(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain or name, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _name(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expression>"
    return None


def unsafe_calls(source: str, where: str = "<snippet>") -> list[str]:
    """Every call that could run code from data: (where, enclosing function, what)."""
    found = []
    tree = ast.parse(source)
    functions = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for child in ast.walk(node):
                functions.setdefault(id(child), node.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):  # an Unpickler must restrict the globals it builds
            bases = {_name(b) for b in node.bases}
            methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            if bases & {"pickle.Unpickler", "Unpickler"} and "find_class" not in methods:
                found.append(f"{where}: class {node.name} unpickles without find_class")
        if not isinstance(node, ast.Call):
            continue
        name, function = _name(node.func), functions.get(id(node), "<module>")
        problem = None
        if name in ("eval", "exec", "compile", "__import__", "os.system", "os.popen", "marshal.loads",
                    "shelve.open", "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                    "joblib.load", "cloudpickle.load", "cloudpickle.loads", "yaml.load", "yaml.unsafe_load",
                    "yaml.full_load", "yaml.load_all", "torch.jit.load") or name.startswith(("os.exec", "os.spawn")):
            problem = name
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            problem = "torch.load without weights_only=True"
        elif name.endswith("np.load") or name == "numpy.load":
            problem = "numpy.load with allow_pickle" if _keyword(node, "allow_pickle") not in (None, False) else None
        elif name.startswith("subprocess.") and (_keyword(node, "shell") not in (None, False)
                                                 or (node.args and isinstance(node.args[0], (ast.Constant,
                                                                                            ast.JoinedStr)))):
            problem = f"{name} with a shell command line"
        if problem and (where, function, problem) not in ALLOWED:
            found.append(f"{where}: {function}: {problem}")
    return found


def test_the_scan_finds_every_kind_of_unsafe_call():
    snippet = """
import pickle, subprocess, os, yaml, torch, numpy as np
def f(path, text):
    torch.load(path)
    torch.load(path, weights_only=False)
    pickle.loads(text)
    eval(text)
    exec(text)
    os.system(text)
    subprocess.run(text, shell=True)
    subprocess.run(f"ls {text}")
    yaml.load(text)
    np.load(path, allow_pickle=True)
    torch.jit.load(path)
class Loose(pickle.Unpickler):
    pass
def fine(path, text, model):
    torch.load(path, map_location="cpu", weights_only=True)
    yaml.safe_load(text)
    subprocess.run(["pip", "download", text])
    np.load(path)
    model.eval()
"""
    found = unsafe_calls(snippet)
    assert len(found) == 12, "\n".join(found)
    assert not any(": fine:" in f for f in found)


def test_source_has_no_unsafe_loads_or_command_lines():
    assert len(SOURCES) > 10
    found = [f for path in SOURCES for f in unsafe_calls(path.read_text(), str(path.relative_to(ROOT / "src/chimle"))
                                                          if "src/chimle" in str(path) else path.name)]
    assert not found, "unsafe calls:\n" + "\n".join(found)


class Payload:
    """Unpickling this would create a file: the proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"generator": Payload(marker)}, evil)
    with pytest.raises(CorruptCheckpointError, match="evil.pt cannot be read"):
        load_state(evil)
    with pytest.raises(Exception, match="loads safely"):
        convert_file(evil, "super-resolution", tmp_path / "out")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        weights.load("lpips-alex", evil)
    assert not marker.exists()


def test_config_files_and_paths_are_data_not_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        resolve(task="super-resolution", preset="tiny", file=config)
    path = f"$(touch {marker}); touch {marker}"
    code = main(["train", "--preset", "tiny", "--data", path, "--out", str(tmp_path / "run")])
    assert code == 2 and "no such folder" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "run").exists()
