"""The layer rule of docs/architecture.md, enforced on the import graph of src/g2d: a module imports
only modules of its own layer or below (never the command line from the library), the two
applications (pre-training, downstream protocols) do not import each other, a downstream protocol
never imports another protocol, and ``import g2d`` loads no training machinery."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom to top; a module belongs to the first layer with a prefix that matches its dotted name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("primitives", ("g2d.errors", "g2d.fingerprint", "g2d.metrics", "g2d.figures", "g2d.pseudo_mask",
                    "g2d.image_input", "g2d.data_spec", "g2d.seeding", "g2d.testing")),
    ("configuration", ("g2d.config",)),
    ("data", ("g2d.data", "g2d.losses")),
    ("model", ("g2d.model", "g2d.checkpoint", "g2d.hub")),
    ("library", ("g2d.factory", "g2d.peers", "g2d.peer_vlm", "g2d.towers", "g2d.objective", "g2d.inference",
                 "g2d.attention_diagnostics")),
    ("applications", ("g2d.train", "g2d.downstream", "g2d.app")),
    ("experiments", ("g2d.reproduce", "g2d.demo")),
    ("command line", ("g2d.commands", "g2d.cli", "g2d.__main__")),
]
SIBLINGS = [("g2d.train", "g2d.downstream")]  # same layer, never importing each other


def _name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("g2d"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names
                       if (SRC / node.module.replace(".", "/") / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("g2d"))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("g2d")):
            out.add(node.args[0].value)
    return out


def _layer(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _graph() -> dict[str, set[str]]:
    return {_name(p): _imports(p) for p in SRC.joinpath("g2d").rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if m != "g2d" and _layer(m) is None)
    assert not unplaced, f"place these modules in a layer (here and in docs/architecture.md): {unplaced}"


def _upward(graph: dict[str, set[str]]) -> list[str]:
    up = []
    for module, deps in graph.items():
        if module == "g2d" or _layer(module) is None:  # unplaced modules fail their own test
            continue
        for dep in deps:
            if dep != "g2d" and _layer(dep) is not None and _layer(dep) > _layer(module):
                up.append(f"{module} ({LAYERS[_layer(module)][0]}) -> {dep} ({LAYERS[_layer(dep)][0]})")
    return sorted(up)


def test_lower_layers_never_import_higher_ones():
    up = _upward(_graph())
    assert not up, "imports that run back up:\n" + "\n".join(up)


def test_the_rule_catches_an_upward_import():
    assert _upward({**_graph(), "g2d.metrics": {"g2d.cli"}}) == ["g2d.metrics (primitives) -> g2d.cli (command line)"]


def test_sibling_applications_stay_apart():
    bad = [f"{m} -> {d}" for m, deps in _graph().items() for a, b in SIBLINGS for src, dst in ((a, b), (b, a))
           if m.startswith(src) for d in deps if d.startswith(dst)]
    assert not bad, bad


def _protocol_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one protocol module (g2d.downstream.protocol.PROTOCOLS) of another."""
    from g2d.downstream.protocol import PROTOCOLS

    protocols = {module for module, _ in PROTOCOLS.values()}
    return sorted(f"{m} -> {d}" for m in protocols for d in graph.get(m, set()) if d in protocols and d != m)


def test_protocols_are_leaves():
    """What protocols share lives in downstream's shared modules (dense, features, harness, protocol,
    results) or lower; a protocol never imports another protocol."""
    bad = _protocol_imports(_graph())
    assert not bad, "protocols importing protocols:\n" + "\n".join(bad)


def test_the_leaf_rule_catches_a_protocol_import():
    graph = _graph()
    graph["g2d.downstream.detection"] = graph["g2d.downstream.detection"] | {"g2d.downstream.segmentation"}
    assert _protocol_imports(graph) == ["g2d.downstream.detection -> g2d.downstream.segmentation"]


def test_the_package_face_imports_only_the_library():
    face = _graph()["g2d"]
    assert all(_layer(d) is not None and _layer(d) <= 4 for d in face if d != "g2d"), face


def test_import_g2d_loads_no_training_machinery():
    code = ("import sys, g2d; bad = sorted(m for m in sys.modules if m.startswith(('g2d.train', "
            "'g2d.downstream', 'g2d.commands', 'g2d.reproduce', 'g2d.demo', 'tensorboard'))); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_passing_tests_leave_no_folders_behind(pytestconfig):
    # The suite writes ~10 GB of checkpoints in all; pytest's default keeps every folder of the last
    # three runs, which filled CI's disk (OSError 28 in the last tests). Pinned in pyproject.toml.
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
