"""How the code reads: dino.py opens with the method, modules import in one direction, one home
per concept, and --help shows the values a run will use."""

import ast
import contextlib
import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import dino

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["augment", "data", "vit", "checkpoint", "knn_eval", "dino", "visualize", "benchmark", "hubconf"]


def project_imports(module: str) -> dict:
    """{imported project module: [line numbers]} of every import in module.py, and which of
    them sit inside a function."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    found, local = {}, []
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        for name in names:
            if name.split(".")[0] in MODULES:
                found.setdefault(name.split(".")[0], []).append(node.lineno)
                if node.col_offset > 0:  # indented: inside a function or class
                    local.append((name, node.lineno))
    return {"imports": found, "local": local}


def test_modules_import_in_one_direction_and_only_at_the_top():
    graph = {m: set(project_imports(m)["imports"]) for m in MODULES}
    # the layout: augment ← data; vit; (data, vit) ← checkpoint ← knn_eval ← dino ← visualize,
    # benchmark; checkpoint ← hubconf. The method's pieces (augment, vit) import no project module.
    base = {"augment", "checkpoint", "data", "vit"}
    assert graph == {"augment": set(), "data": {"augment"}, "vit": set(), "checkpoint": {"data", "vit"},
                     "knn_eval": base, "dino": base | {"knn_eval"},
                     "visualize": base | {"dino", "knn_eval"}, "benchmark": {"augment", "data", "dino", "vit"},
                     "hubconf": {"checkpoint", "vit"}}
    for m in MODULES:
        assert project_imports(m)["local"] == [], m


def test_no_import_circle():
    graph = {m: set(project_imports(m)["imports"]) for m in MODULES}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph[start])

    assert not [m for m in MODULES if reaches(m, m)]


def function_lengths(path: Path, within: str | None = None) -> dict:
    tree = ast.parse(path.read_text())
    nodes = tree.body
    if within:
        nodes = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == within).body
    return {n.name: n.end_lineno - n.lineno + 1 for n in nodes if isinstance(n, ast.FunctionDef)}


def test_dino_py_opens_with_the_method():
    lines = (ROOT / "dino.py").read_text().splitlines()
    first_equation = next(i for i, line in enumerate(lines, 1) if line.strip().startswith("#") and "$$" in line)
    assert first_equation <= 150
    # the one-step function reads beside Algorithm 1; no method of the loop is long
    assert function_lengths(ROOT / "dino.py")["train_step"] <= 40
    assert max(function_lengths(ROOT / "dino.py", within="Trainer").values()) <= 50


def test_no_class_or_function_is_long():
    """A reader holds a class in ≤ 300 lines and a function or method in ≤ 60, in every module,
    command-line parsers and the benchmark included."""
    for module in MODULES:
        for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                limit = 300 if isinstance(node, ast.ClassDef) else 60
                assert length <= limit, f"{module}.{node.name}: {length} lines"


def test_the_dino_loop_has_no_supervised_branch():
    """The supervised baseline is a class beside the loop (SupervisedTrainer), not a branch in it."""
    tree = ast.parse((ROOT / "dino.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    assert "supervised" not in ast.unparse(trainer).lower()


def test_checkpoints_are_read_and_written_in_one_place():
    """torch.save and torch.load of the project's files sit in checkpoint.py alone."""
    for module in MODULES:
        calls = [ast.unparse(node.func) for node in ast.walk(ast.parse((ROOT / f"{module}.py").read_text()))
                 if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.save", "torch.load")]
        assert calls == (["torch.save", "torch.load"] if module == "checkpoint" else []), (module, calls)


def definitions(name: str) -> list:
    """Where `name` is defined (def, class or module-level assignment) across the project."""
    where = []
    for module in MODULES + ["notebooks/_common"]:
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                where.append(module)
            elif isinstance(node, ast.Assign) and node in tree.body and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                where.append(module)
    return where


@pytest.mark.parametrize("name", ["vit_from_state_dict", "backbone_state_dict", "load_backbone",
                                  "normalize", "unnormalize", "peak_memory", "config_from_dict",
                                  "derive_seed", "IMAGENET_MEAN", "IMAGENET_STD", "require",
                                  "DinoError", "load_checkpoint", "save_checkpoint", "resolve_device",
                                  "warm_start_weights", "finish_views", "photometric", "multicrop"])
def test_one_home_per_concept(name):
    assert len(definitions(name)) == 1, definitions(name)


def test_the_seed_rule_is_written_once_and_its_streams_never_collide():
    sources = "".join((ROOT / f"{m}.py").read_text() for m in MODULES)
    assert sources.count("* 1_000_003") == 1  # in data.derive_seed only
    # the step generator of step s and the crops of the image at position s used to share a seed
    seeds = {data.derive_seed(0, stream, 0, s) for stream in ("views", "folder_crops") for s in range(50)}
    seeds |= {data.derive_seed(0, "drop_path", s, 0) for s in range(50)}
    assert len(seeds) == 150


def help_text(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        dino.parse_config(argv + ["--help"])
    return re.sub(r"\s+", " ", out.getvalue())


def test_help_shows_the_values_the_run_will_use(tmp_path):
    shapes = help_text([])
    assert "backbone (default: vit_nano; paper: vit_small)" in shapes
    assert "images per step (per process) (default: 32; paper: 64)" in shapes
    assert "--no_centering" in shapes and "--no_use_bn_in_head" in shapes
    cifar = tmp_path / "cifar10"
    (cifar / "cifar-10-batches-py").mkdir(parents=True)
    text = help_text(["--data", str(cifar), "--device", "cpu"])
    # on a CPU, CIFAR-10 gets the one-hour recipe (tests/test_time_limit.py pins both recipes)
    assert f"backbone (default: {dino.CPU_RECIPE['arch']}; paper: vit_small)" in text
    assert f"images per step (per process) (default: {dino.CPU_RECIPE['batch_size']}" in text
    assert "ViT patch size p in pixels (default: 4; paper: 16)" in text
    assert "(default: 60; paper: 0.0)" in text  # --time_limit


def test_the_parsed_config_is_the_preset_under_the_flags_given():
    cfg = dino.parse_config(["--epochs", "7", "--no_use_bn_in_head"])
    assert cfg == dino.make_config({"epochs": 7, "use_bn_in_head": False}, 32, "shapes")
    assert (cfg.arch, cfg.batch_size, cfg.epochs, cfg.use_bn_in_head) == ("vit_nano", 32, 7, False)


class RunsCode:
    """Unpickling this calls Path.touch(marker): a stand-in for a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path):
    base = tmp_path / "evil_cifar" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    marker = tmp_path / "ran"
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": RunsCode(marker)}))
    with pytest.raises(data.DinoError, match="batches.meta is not a readable CIFAR-10 file.*Path.touch|pathlib"):
        data.load_data(str(tmp_path / "evil_cifar"))
    assert not marker.exists()
    # the real format (dicts, lists, bytes, numpy arrays) still loads
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    batch = {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [1, 2], "filenames": [b"a", b"b"]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    train, test = data.load_cifar10(tmp_path / "evil_cifar")
    assert train.images.shape == (10, 3, 32, 32) and test.labels.tolist() == [1, 2]
    (base / "data_batch_3").write_bytes(pickle.dumps(batch)[:40])  # truncated
    with pytest.raises(data.DinoError, match="data_batch_3 is not a readable CIFAR-10 file"):
        data.load_cifar10(tmp_path / "evil_cifar")
    (base / "data_batch_3").unlink()
    with pytest.raises(data.DinoError, match="data_batch_3 is missing"):
        data.load_cifar10(tmp_path / "evil_cifar")


def test_momentum_teacher_end_zero_makes_the_teacher_a_copy():
    cfg = dino.Config(epochs=2, momentum_teacher=0.0, momentum_teacher_end=0.0)
    assert torch.equal(dino.schedules(cfg, 5)["momentum"], torch.zeros(10, dtype=torch.float64))
