"""The house: one vocabulary for how the model computes, and a package without import cycles.

Every name of `dsv3ref.impl.CHOICES` is walked through each place that takes it (the model, its
`impl`, from_pretrained, the cache, kv_cache_bytes, the CLI), and a name outside the vocabulary is
refused by each with the same message. The import graph of dsv3ref's modules (top-level imports;
`if TYPE_CHECKING:` blocks are for type checkers only) has no cycle, and no function imports a
dsv3ref module late to dodge one.
"""

import ast
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

import dsv3ref
from dsv3ref import DeepseekV3, Implementation, KVCache, kv_cache_bytes
from dsv3ref.cli import build_parser
from dsv3ref.impl import CHOICES, PARALLEL_FIELDS
from dsv3ref.parallel import Parallel

PACKAGE = Path(dsv3ref.__file__).parent


def module_imports(path: Path) -> tuple[set[str], list[str]]:
    """(dsv3ref modules imported at the top level of `path`, dsv3ref imports made inside functions)."""
    tree = ast.parse(path.read_text())
    modules = {p.stem for p in PACKAGE.glob("*.py")}

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name.split(".")[1] for a in node.names if a.name.startswith("dsv3ref.")}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dsv3ref":
            if node.module == "dsv3ref":  # from dsv3ref import mla, routing
                return {a.name for a in node.names if a.name in modules}
            return {node.module.split(".")[1]}
        return set()

    top, late = set(), []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        top |= targets(node)
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            late += [f"{path.name}:{n.lineno}" for n in ast.walk(node) if targets(n)]
    return top, late


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph {module: modules it imports}, as a path, or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return trail + [module, dep]
            if dep not in state and (found := visit(dep, trail + [module])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [])):
            return found
    return None


def test_the_package_has_no_import_cycle_and_no_deferred_imports():
    graph, late = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        graph[path.stem], deferred = module_imports(path)
        late += deferred
    assert late == [], f"dsv3ref imports inside functions: {late}"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert {"model", "checkpoint", "config", "mtp", "speculative"} <= set(graph)


def test_the_checks_can_fail(tmp_path):
    assert find_cycle({"config": {"checkpoint"}, "checkpoint": {"model"}, "model": {"config"}}) == \
        ["checkpoint", "model", "config", "checkpoint"]
    assert find_cycle({"model": {"config"}, "checkpoint": {"config"}}) is None
    (tmp_path / "b.py").write_text("import torch\n\n\ndef f():\n    from dsv3ref.a import y\n")
    assert module_imports(tmp_path / "b.py") == (set(), ["b.py:5"])


def every_implementation():
    """Every valid combination of the vocabulary's values."""
    for attn in CHOICES["attn_impl"]:
        for order in CHOICES["attn_order"] if attn == "absorb" else ("auto",):
            for moe in CHOICES["moe_impl"]:
                for gemm in CHOICES["gemm_impl"]:
                    for kernel in CHOICES["fp8_kernel"] if gemm == "fp8" else ("emulate",):
                        if gemm == "fp8" and moe != "loop":
                            continue
                        yield Implementation(attn, order, moe, gemm, kernel)


MODEL_FIELDS = [f for f in CHOICES if f not in PARALLEL_FIELDS]


def test_every_name_is_taken_by_the_model_from_pretrained_the_cache_and_the_cli(fp8_folder):
    cfg = tiny_config()
    impls = list(every_implementation())
    assert {getattr(i, f) for i in impls for f in MODEL_FIELDS} >= {v for f in MODEL_FIELDS for v in CHOICES[f]}
    ids = torch.tensor([[1, 2, 3]])
    for impl in impls:
        keywords = {f: getattr(impl, f) for f in MODEL_FIELDS}
        model = DeepseekV3(cfg.replace(quantization_config=None), **keywords)
        loaded = DeepseekV3.from_pretrained(fp8_folder, **keywords)
        for m in (model, loaded):
            assert m.impl == impl
            cache = m.new_cache(1, 8)
            assert cache.attn_impl == impl.attn_impl
            with torch.no_grad():
                assert m(ids, cache=cache).shape == (1, 3, cfg.vocab_size)
        argv = ["generate", "--prompt", "x"] + [a for f in MODEL_FIELDS for a in (f"--{f.replace('_', '-')}",
                                                                                  keywords[f])]
        args = build_parser().parse_args(argv)
        assert {f: getattr(args, f) for f in MODEL_FIELDS} == keywords
    for layout in CHOICES["layout"]:  # the parallel names: the plan and the CLI (tests/test_parallel.py runs them)
        for comm in CHOICES["moe_comm"]:
            assert Parallel(layout, comm) == Parallel(layout=layout, moe_comm=comm)
            args = build_parser().parse_args(["chat", "--layout", layout, "--moe-comm", comm])
            assert (args.layout, args.moe_comm) == (layout, comm)
    for attn_impl in CHOICES["attn_impl"]:
        assert KVCache(cfg, 1, 8, attn_impl).attn_impl == attn_impl
    assert set(kv_cache_bytes(cfg, 8)) == set(CHOICES["attn_impl"])


@pytest.mark.parametrize("field", list(CHOICES))
def test_a_name_outside_the_vocabulary_gets_the_same_error_everywhere(field, capsys):
    message = f"{field}: found 'bogus', expected one of {CHOICES[field]}"
    with pytest.raises(ValueError) as e:
        (Parallel if field in PARALLEL_FIELDS else Implementation)(**{field: "bogus"})
    assert str(e.value) == message
    if field not in PARALLEL_FIELDS:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            DeepseekV3(tiny_config(), **{field: "bogus"})
    if field == "attn_impl":
        with pytest.raises(ValueError, match="attn_impl: found 'bogus'"):
            KVCache(tiny_config(), 1, 8, "bogus")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", f"--{field.replace('_', '-')}", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_the_order_is_chosen_on_the_model_and_the_old_attribute_says_so():
    model = DeepseekV3(tiny_config(), attn_impl="absorb", attn_order="expanded")
    assert [layer.self_attn.attn_order for layer in model.model.layers] == ["expanded"] * 3
    model.set_attn_order("absorbed")
    assert model.impl.attn_order == "absorbed" and model.model.layers[2].self_attn.order == "absorbed"
    with pytest.raises(AttributeError, match=r"MLA.order is now attn_order.*set_attn_order\('auto'\)"):
        model.model.layers[0].self_attn.order = "auto"  # not a silent no-op
    with pytest.raises(ValueError, match="attn_order='expanded' chooses the order of absorbed attention"):
        DeepseekV3(tiny_config(), attn_order="expanded")


def test_loading_reports_what_it_found_as_a_declared_result(fp8_folder):
    model = DeepseekV3.from_pretrained(fp8_folder)
    assert model.load_report.path == fp8_folder and model.load_report.unused_tensors == ()
    assert DeepseekV3(tiny_config()).load_report is None
    assert not set(vars(model)) - set(vars(DeepseekV3(tiny_config())))  # loading adds no attribute
