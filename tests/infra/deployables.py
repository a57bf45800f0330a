"""Read the deployable parts as the tools do: template.yaml through the real SAM translator (offline), the
Dockerfile as instructions per stage. Shared by the tests in tests/infra/."""

from __future__ import annotations

import copy
import json
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
DOCKERFILE = ROOT / "Dockerfile"
CATCH_ALL = {"/": "x-amazon-apigateway-any-method", "/{proxy+}": "x-amazon-apigateway-any-method"}
"""The routes of each API that send every path and method no other route names to the function."""
# What `sam build` + `sam deploy --resolve-image-repos` put in place of the image it built.
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/phi2-lambda:phi2-v1"


class _NoManagedPolicies:
    """The translator looks managed policy names up with IAM; this template names none (it uses only
    the role SAM derives from Tracing), so an empty table is the true answer offline."""

    def load(self) -> dict[str, str]:
        return {}


@cache
def template_source() -> dict[str, Any]:
    from samtranslator.yaml_helper import yaml_parse

    return yaml_parse(TEMPLATE.read_text())


def parameter_defaults() -> dict[str, Any]:
    return {name: spec.get("Default") for name, spec in template_source()["Parameters"].items()}


def translate(**parameters: Any) -> dict[str, Any]:
    """template.yaml as CloudFormation sees it after the SAM transform, for these parameter values."""
    from samtranslator.translator.transform import transform

    source = copy.deepcopy(template_source())
    for resource in source["Resources"].values():
        if resource["Type"] == "AWS::Serverless::Function" and resource["Properties"].get("PackageType") == "Image":
            resource["Properties"].setdefault("ImageUri", IMAGE_URI)
    values = {**parameter_defaults(), **parameters}
    return json.loads(json.dumps(transform(source, values, _NoManagedPolicies())))


def resources_of_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def only(template: dict[str, Any], kind: str) -> dict[str, Any]:
    found = resources_of_type(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.values()))


def evaluate(expression: Any, template: dict[str, Any], parameters: dict[str, Any]) -> Any:
    """Evaluate the intrinsic functions conditions use (Ref, Fn::Equals/Not/And/Or, Condition, Fn::If)."""
    if expression == {"Ref": "AWS::NoValue"}:
        return None
    if isinstance(expression, list):  # CloudFormation drops the items that resolve to AWS::NoValue
        items = (evaluate(item, template, parameters) for item in expression)
        return [item for item in items if item is not None]
    if isinstance(expression, dict) and len(expression) == 1:
        (key, arg), values = next(iter(expression.items())), {**parameter_defaults(), **parameters}
        if key == "Ref":
            return str(values[arg]) if arg in values else expression
        if key == "Condition":
            return evaluate(template["Conditions"][arg], template, parameters)
        if key == "Fn::Equals":
            left, right = (evaluate(a, template, parameters) for a in arg)
            return str(left) == str(right)
        if key == "Fn::Not":
            return not evaluate(arg[0], template, parameters)
        if key == "Fn::And":
            return all(evaluate(a, template, parameters) for a in arg)
        if key == "Fn::Or":
            return any(evaluate(a, template, parameters) for a in arg)
        if key == "Fn::If":
            name, then, otherwise = arg
            chosen = then if evaluate(template["Conditions"][name], template, parameters) else otherwise
            return evaluate(chosen, template, parameters)
    return expression


def resolve(value: Any, parameters: dict[str, Any] | None = None) -> Any:
    """A property value with parameter Refs replaced by the parameters' values (defaults otherwise)."""
    values = {**parameter_defaults(), **(parameters or {})}
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in values:
        return str(values[value["Ref"]])
    return value


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        """The last ENTRYPOINT/CMD of the stage, in exec (JSON) form."""
        return json.loads(self.all(keyword)[-1])

    def env(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                found[name] = value
        return found


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def args(self) -> dict[str, str]:
        """Every ARG, global or per stage, with its default ('' when it has none)."""
        found = dict(self.global_args)
        for stage in self.stages:
            for args in stage.all("ARG"):
                name, _, default = args.partition("=")
                found.setdefault(name, default)
        return found


def parse_dockerfile(text: str | None = None) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped, grouped by stage."""
    text = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            assert match, f"unparsed FROM {args}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(global_args, stages)
