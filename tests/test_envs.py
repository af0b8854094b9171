"""``fastvideo.envs``: the one place the engine reads its ``FASTVIDEO_*`` variables."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fastvideo import envs

PACKAGE = Path(envs.__file__).resolve().parent


def _environment_reads(tree: ast.AST) -> list[tuple[int, ast.expr | None]]:
    """(line, key) of each ``os.environ[key]``, ``os.environ.get(key)``, ``os.getenv(key)``
    and ``key in os.environ``; key None for any other use of ``os.environ`` (a copy)."""

    def is_environ(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "environ"
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )

    reads: list[tuple[int, ast.expr | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            reads.append((node.lineno, node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            getenv = func.attr == "getenv" and isinstance(func.value, ast.Name)
            getenv = getenv and func.value.id == "os"
            if (getenv or (func.attr in ("get", "pop") and is_environ(func.value))) and node.args:
                reads.append((node.lineno, node.args[0]))
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            reads.append((node.lineno, node.left))
    return reads


def test_fastvideo_variables_are_read_only_in_envs():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == Path(envs.__file__).resolve():
            continue
        for line, key in _environment_reads(ast.parse(path.read_text())):
            literal = isinstance(key, ast.Constant) and isinstance(key.value, str)
            if not literal or key.value.startswith("FASTVIDEO_"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert offenders == [], "read FASTVIDEO_* variables through fastvideo.envs"


def test_every_variable_is_declared_documented_and_in_the_readme():
    declared = [v for v in vars(envs).values() if isinstance(v, envs.EnvVar)]
    assert {v.name for v in declared} == {v.name for v in envs.ALL}
    readme = (PACKAGE / "README.md").read_text()
    for variable in envs.ALL:
        assert getattr(envs, variable.name) is variable
        assert variable.doc and variable.type
        assert f"`{variable.name}`" in readme


def test_values_are_read_when_asked_and_typed(monkeypatch):
    for name in ("FUSED_KERNELS", "ATTENTION_BACKEND", "LOG_LEVEL", "FLEX_KERNEL_OPTIONS"):
        monkeypatch.delenv(f"FASTVIDEO_{name}", raising=False)
    assert envs.FASTVIDEO_FUSED_KERNELS.get() is True
    assert envs.FASTVIDEO_ATTENTION_BACKEND.get() is None
    assert envs.FASTVIDEO_LOG_LEVEL.get() == "WARNING"
    assert envs.FASTVIDEO_FLEX_KERNEL_OPTIONS.get() is None
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", off)
        assert envs.FASTVIDEO_FUSED_KERNELS.get() is False
    for on in ("1", "yes", ""):  # empty: the default
        monkeypatch.setenv("FASTVIDEO_FUSED_KERNELS", on)
        assert envs.FASTVIDEO_FUSED_KERNELS.get() is True
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", "  ")
    assert envs.FASTVIDEO_ATTENTION_BACKEND.get() is None
    monkeypatch.setenv("FASTVIDEO_ATTENTION_BACKEND", " torch_sdpa ")
    assert envs.FASTVIDEO_ATTENTION_BACKEND.get() == "torch_sdpa"
    monkeypatch.setenv("FASTVIDEO_LOG_LEVEL", "info")
    assert envs.FASTVIDEO_LOG_LEVEL.get() == "INFO"
    monkeypatch.setenv("FASTVIDEO_FLEX_KERNEL_OPTIONS", '{"BLOCK_M": 64}')
    assert envs.FASTVIDEO_FLEX_KERNEL_OPTIONS.get() == {"BLOCK_M": 64}


@pytest.mark.parametrize(
    "value, message",
    [("{BLOCK_M: 64", "FASTVIDEO_FLEX_KERNEL_OPTIONS is not JSON"), ("[64]", "a JSON object")],
)
def test_a_bad_value_names_the_variable(monkeypatch, value, message):
    monkeypatch.setenv("FASTVIDEO_FLEX_KERNEL_OPTIONS", value)
    with pytest.raises(ValueError, match=message):
        envs.FASTVIDEO_FLEX_KERNEL_OPTIONS.get()
