"""Imports point one way: cli -> stages -> components -> config.

Components never import a stage or the CLI, and the pure modules (prompt
format, rubrics, losses, quality, stats) import no Ray.  Checked on the source
with ast, so a lazy import inside a function counts too.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "cai_ray"
PURE = ["constitution", "judge/rubrics.py", "judge/refusal.py", "evaluation/report.py", "evaluation/render.py",
        "evaluation/sets.py", "train/losses.py", "quality.py", "stats.py",
        "data/heldout.py", "config", "files.py"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _modules(rel: str) -> list[Path]:
    target = PKG / rel
    return sorted(target.rglob("*.py")) if target.is_dir() else [target] if target.exists() else []


def test_components_never_import_stages_or_cli():
    offenders = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        # The CLI and pipeline.py (run, sweep) are the only places that chain stages.
        if rel.parts[0] == "stages" or rel.name in ("cli.py", "__main__.py", "pipeline.py"):
            continue
        for name in _imports(path):
            if name.startswith(("cai_ray.stages", "cai_ray.cli", "cai_ray.__main__")):
                offenders.append(f"{rel} imports {name}")
    assert offenders == []


def test_stages_never_import_each_other():
    offenders = []
    for path in (PKG / "stages").glob("*.py"):
        for name in _imports(path):
            if name.startswith("cai_ray.stages.") and name != f"cai_ray.stages.{path.stem}":
                offenders.append(f"stages/{path.name} imports {name}")
    assert offenders == []


def test_pure_modules_import_no_ray():
    checked, offenders = 0, []
    for rel in PURE:
        for path in _modules(rel):
            checked += 1
            offenders += [f"{path.relative_to(PKG)} imports {n}" for n in _imports(path)
                          if n.split(".")[0] in ("ray", "vllm", "mlflow", "deepspeed")]
    assert checked >= 5 and offenders == []


def test_only_the_vllm_engine_imports_vllm():
    users = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
             if any(n.split(".")[0] == "vllm" for n in _imports(p))]
    assert set(users) <= {"engines/vllm.py"}
