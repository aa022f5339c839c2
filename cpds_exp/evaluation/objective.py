"""The number a hyper-parameter search optimises: the ``objective`` expression (``clip - lpips`` by
default) of a job's mean CLIP score and LPIPS.

The expression comes from a config, so it is parsed into a syntax tree and only arithmetic on
numbers and the two metric names is evaluated: a config can never run code.
"""
from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
from omegaconf import DictConfig

from cpds_exp.errors import CpdsError

NAMES = ("clip", "lpips")
_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.USub: operator.neg, ast.UAdd: operator.pos}
#: Hydra's grid sweeper ignores what jobs return; every other sweeper (Optuna, Nevergrad, Ax) optimises it
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"

Objective = Callable[[Mapping[str, float]], float]


def _refuse(expression: str, problem: str) -> CpdsError:
    return CpdsError(f"objective={expression!r}: {problem}; write arithmetic (+ - * / and numbers) of "
                     f"{' and '.join(NAMES)}, e.g. objective='clip - 2 * lpips'")


def _allowed(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    if isinstance(node, ast.Name):
        return node.id in NAMES
    return isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load)) or type(node) in _OPERATORS


def _evaluate(node: ast.AST, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.UnaryOp):
        return _OPERATORS[type(node.op)](_evaluate(node.operand, values))
    return _OPERATORS[type(node.op)](_evaluate(node.left, values), _evaluate(node.right, values))


def compile_objective(expression: str) -> Objective:
    """``expression`` as a function of ``{"clip": ..., "lpips": ...}``; a one-line error for anything
    but arithmetic of numbers and those names. A division by zero gives NaN (a failed trial)."""
    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError:
        raise _refuse(expression, "not an arithmetic expression") from None
    refused = next((node for node in ast.walk(tree) if not _allowed(node)), None)
    if refused is not None:
        what = (f"the name {refused.id!r}" if isinstance(refused, ast.Name) else f"'{ast.unparse(refused)}'"
                if isinstance(refused, ast.expr) else f"the operator {type(refused).__name__}")
        raise _refuse(expression, f"{what} is not allowed")

    def objective(values: Mapping[str, float]) -> float:
        try:
            return _evaluate(tree.body, values)
        except ZeroDivisionError:
            return math.nan
    return objective


def mean_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each metric over the finished edits (``status`` done) that have it; NaN without any."""
    done = [record for record in records if record.get("status") == "done"]
    return {name: float(pd.Series([record.get(name) for record in done], dtype="float64").mean()) for name in NAMES}


def job_objective(cfg: DictConfig, sweeper: str | None) -> Callable[[Sequence[Mapping[str, Any]]], float | None]:
    """What a job returns from its records: the objective of their mean scores, or None when there is
    none (no edit finished with scores, a division by zero, no metrics): Optuna's sweeper records a
    failed trial for None and goes on (a NaN would stop it). Checked at once, before any model loads:
    a bad expression, or ``metrics=none`` under a sweeper that optimises."""
    objective = compile_objective(cfg.objective)
    if cfg.metrics.enabled:
        def value(records: Sequence[Mapping[str, Any]]) -> float | None:
            result = objective(mean_scores(records))
            return None if math.isnan(result) else result
        return value
    if sweeper and sweeper != BASIC_SWEEPER:
        raise CpdsError(f"objective={cfg.objective!r} needs CLIP and LPIPS but metrics=none computes neither: "
                        "use metrics=default (or metrics=random for a dry run) with this sweeper")
    return lambda records: None
