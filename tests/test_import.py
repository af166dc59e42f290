"""`import cbst_jax` (and its runtime submodules) must not pull in tensorflow or torch."""
import subprocess
import sys


def test_no_tensorflow_or_torch():
    code = ("import sys, cbst_jax, cbst_jax.labels, cbst_jax.metrics, cbst_jax.priors, cbst_jax.sharding\n"
            "for m in ('cbst_jax.selection', 'cbst_jax.models', 'cbst_jax.data', 'cbst_jax.train_step',"
            " 'cbst_jax.predictor', 'cbst_jax.self_training', 'cbst_jax.cli.run', 'cbst_jax.cli.evaluate',"
            " 'cbst_jax.cli.export', 'cbst_jax.cli.infer', 'cbst_jax.cli.convert_weights'):\n"
            "    try:\n        __import__(m)\n    except ModuleNotFoundError as e:\n"
            "        if not e.name.startswith('cbst_jax'): raise\n"
            "bad = [m for m in ('tensorflow', 'torch', 'tensorflow_datasets') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _import_graph(package_dir: str) -> dict:
    """Module -> project modules it imports (at top level or inside functions), from the ASTs.
    ``from pkg import sub`` of a submodule counts as importing ``pkg.sub`` only."""
    import ast
    import os

    root = os.path.dirname(package_dir)
    mods = {}
    for d, _, files in os.walk(package_dir):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                mods[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    top = os.path.basename(package_dir)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == top}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == top:
                subs = {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods}
                deps |= subs
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycles():
    import os

    graph = _import_graph(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cbst_jax"))
    assert len(graph) > 30
    state, cycles = {}, []

    def visit(u, stack):
        state[u] = "open"
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack + [v])
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])
    assert not cycles, [" -> ".join(c) for c in cycles]
    # the schema imports nothing above it: the method table, and for validation the names of the
    # models, input normalisations and NTHU cities
    assert graph["cbst_jax.config_lib"] <= {"cbst_jax.methods", "cbst_jax.models.registry", "cbst_jax.models.layers",
                                            "cbst_jax.data.nthu"}
    assert not graph["cbst_jax.methods"]
