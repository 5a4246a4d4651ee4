"""Bad RLHFJob input never crashes anything: thousands of malformed specs, each answered with SpecError.

The inputs start from the shipped examples and are broken the way people and tools break YAML:
wrong types at any path, unknown keys at any level, missing keys, NaN / inf / huge numbers,
unicode, junk nested deep, non-mapping roots, and text that is not YAML at all. For each one
`api.parse_job` may only succeed or raise SpecError, every problem line starts with a dotted path
into the input or the schema followed by ": ", and `kuberlhf validate` prints exactly those lines.
Run with `-s` to see how many inputs were tried.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberlhf import api, cli, specfile

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASES = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}
INPUTS: Counter[str] = Counter()
# No example database: each run explores fresh inputs, and no .hypothesis/ folder is left behind.
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _schema_fields() -> set[str]:
    """Every field name (YAML alias and Python name) of every API model."""
    names = {"<root>", "[key]"}
    models = [m for m in vars(api).values() if isinstance(m, type) and issubclass(m, pydantic.BaseModel)]
    for model in models:
        for name, info in model.model_fields.items():
            names |= {name, info.alias or name}
    return names


SCHEMA_FIELDS = _schema_fields()

# Keys never contain "." or ": " so a problem's path can be split back into its parts.
keys = st.text(st.characters(blacklist_characters=".:", blacklist_categories=["Cs"]), min_size=1,
               max_size=12)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["1e-3", "8Gi", "lots", "", "ppo ", "GRPO", "null", "\u202e\u0000", "🤖"]),
)
junk = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every position in a decoded document (the root is the empty path)."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, (*prefix, index))


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def malformed_documents(draw: st.DrawFn) -> Any:
    """An example with one to three mutations at random positions."""
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict | list):
            break
        path = draw(st.sampled_from(list(paths(doc))))
        kind = draw(st.sampled_from(["replace", "delete", "unknown-key", "wrap", "root"]))
        if kind == "root" or not path:
            doc = draw(st.one_of(junk, st.sampled_from([[doc], "RLHFJob", 42, None])))
            continue
        target: Any = _parent(doc, path)
        if kind == "replace":
            target[path[-1]] = draw(junk)
        elif kind == "delete":
            del target[path[-1]]
        elif kind == "wrap":
            target[path[-1]] = draw(st.sampled_from([[target[path[-1]]], {"value": target[path[-1]]}]))
        else:
            node = target[path[-1]]
            if isinstance(node, dict):
                node[draw(keys)] = draw(junk)
    return doc


# A path part: a quoted key (Python repr, for keys with dots, colons or blanks) or a plain name.
SEGMENT = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^.:]+"""
PROBLEM_HEAD = re.compile(rf"((?:{SEGMENT})(?:\.(?:{SEGMENT}))*): ")


def input_keys(node: Any) -> set[str]:
    """Keys as a problem path may show them: plain, or quoted when blank or unprintable."""
    parts = {str(p) for path in paths(node) for p in path}
    return parts | {repr(p) for p in parts}


def assert_well_formed(problems: list[str], doc: Any) -> None:
    """Each problem is one line, "<dotted path>: <message>", its path made of real field names."""
    assert problems, "a SpecError must name at least one problem"
    known = SCHEMA_FIELDS | input_keys(doc)
    for problem in problems:
        assert "\n" not in problem, problem
        head = PROBLEM_HEAD.match(problem)
        assert head and problem[head.end():], f"no 'path: message' in {problem!r}"
        for part in re.findall(SEGMENT, head[1]):
            assert part in known or part.isdigit(), f"{part!r} of {problem!r}: not a known field"


def problems_of(doc: Any) -> list[str]:
    """[] for a valid spec, else the SpecError's problems; any other exception fails the test."""
    INPUTS["parse_job"] += 1
    try:
        api.parse_job(doc)
    except api.SpecError as exc:
        assert_well_formed(exc.problems, doc)
        return exc.problems
    return []


@pytest.fixture(scope="module", autouse=True)
def report_input_count() -> Iterator[None]:
    yield
    print(f"\nfuzzed inputs: {dict(INPUTS)}, total {sum(INPUTS.values())}")


@settings(FUZZ, max_examples=2000)
@given(malformed_documents())
def test_parse_job_answers_any_mutated_example_with_spec_error_lines(doc: Any) -> None:
    problems_of(doc)


@pytest.mark.unit
@settings(FUZZ, max_examples=600)
@given(junk)
def test_parse_job_answers_arbitrary_junk_with_spec_error_lines(doc: Any) -> None:
    problems = problems_of(doc)
    assert problems, "junk is never a valid RLHFJob"
    if not isinstance(doc, dict):
        assert problems == [f"<root>: expected a mapping (an RLHFJob object), got {type(doc).__name__}"]


FLOAT_FIELDS = [
    ("rollout", "temperature"), ("rollout", "gpuMemoryUtilization"), ("rollout", "topP"),
    ("actor", "learningRate"), ("actor", "maxGradNorm"), ("kl", "coef"), ("loss", "clipRange"),
    ("loss", "valueClipRange"), ("loss", "gamma"), ("loss", "lambda"), ("reward", "timeoutSeconds"),
    ("weightSync", "timeoutSeconds"),
]


@pytest.mark.unit
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("section", "field"), FLOAT_FIELDS)
def test_nan_and_infinity_are_refused_for_every_float_field(section: str, field: str, value: float) -> None:
    doc = copy.deepcopy(BASES["tiny-grpo"])
    doc["spec"].setdefault(section, {})[field] = value
    problems = problems_of(doc)
    assert any(p.startswith(f"spec.{section}.{field}: ") for p in problems), problems


@pytest.mark.unit
@pytest.mark.parametrize(("section", "field", "limit"), [
    (None, "ttlSecondsAfterFinished", 2**31 - 1), ("tolerations", "tolerationSeconds", 2**63 - 1),
])
def test_integers_beyond_what_kubernetes_stores_are_refused(section: str | None, field: str,
                                                            limit: int) -> None:
    doc = copy.deepcopy(BASES["tiny-grpo"])
    if section == "tolerations":
        doc["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists", field: limit}]
        assert problems_of(doc) == [], "the largest value Kubernetes stores must be accepted"
        doc["spec"]["tolerations"][0][field] = limit + 1
        where = f"spec.tolerations.0.{field}: "
    else:
        doc["spec"][field] = limit
        assert problems_of(doc) == []
        doc["spec"][field] = limit + 1
        where = f"spec.{field}: "
    assert any(p.startswith(where) for p in problems_of(doc))


@pytest.mark.unit
def test_an_alias_bomb_is_answered_quickly_with_short_lines() -> None:
    """YAML aliases share one object; an error message that printed it whole would never finish."""
    bomb: Any = [1] * 10
    for _ in range(8):
        bomb = [bomb] * 10  # 10**9 leaves if expanded
    doc = copy.deepcopy(BASES["tiny-grpo"])
    doc["spec"]["rollout"] = bomb
    with pytest.raises(api.SpecError) as raised:
        api.parse_job(doc)
    problems = raised.value.problems
    assert any(p.startswith("spec.rollout: ") for p in problems)
    assert max(len(p) for p in problems) < 400


# --- kuberlhf validate, in-process -------------------------------------------------------------

_TMP = Path(tempfile.mkdtemp(prefix="kuberlhf-fuzz-"))


def run_validate(text: str | bytes) -> tuple[int, str, str, Path]:
    path = _TMP / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.cmd_validate(argparse.Namespace(files=[str(path)]))
    INPUTS["kuberlhf validate"] += 1
    return code, out.getvalue(), err.getvalue(), path


def expected_problems(path: Path) -> list[str]:
    """What validate must print for a single-document file, computed from the library directly."""
    try:
        docs = specfile.load_documents(path)
        if not docs:
            return [f"{path}: no YAML document found"]
        problems: list[str] = []
        for doc in docs:
            try:
                job = api.parse_job(doc)
                problems += specfile.local_problems(job, path.parent)
                if not problems:  # validate then renders the cluster objects, which plan GPU memory
                    cli.cluster_checks(job)
            except api.SpecError as exc:
                return problems + exc.problems
        return problems
    except api.SpecError as exc:
        return exc.problems


def _dump(doc: Any) -> str:
    try:
        return yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return yaml.safe_dump(repr(doc))


@st.composite
def broken_texts(draw: st.DrawFn) -> str | bytes:
    """YAML text: a dumped malformed document, or an example's text cut, spliced or garbled."""
    source = draw(st.sampled_from(sorted(EXAMPLES.glob("*.yaml")))).read_text()
    kind = draw(st.sampled_from(["dumped", "cut", "splice", "bytes", "scalar"]))
    if kind == "dumped":
        return _dump(draw(malformed_documents()))
    if kind == "scalar":
        return draw(st.sampled_from(["42\n", "- a\n- b\n", "'just text'\n", "---\n...\n", "", "~\n"]))
    start = draw(st.integers(0, len(source)))
    end = draw(st.integers(start, min(len(source), start + 40)))
    if kind == "cut":
        return source[:start] + source[end:]
    if kind == "splice":
        junk_text = draw(st.sampled_from(["{", "]", ": :", "\t", "&a *b", "!!python/name:os.system", "\n  - ",
                                          "'", '"\\ud800"', "%YAML 9"]))
        return source[:start] + junk_text + source[end:]
    return source.encode()[:start] + draw(st.binary(min_size=1, max_size=4)) + source.encode()[end:]


@settings(FUZZ, max_examples=500)
@given(broken_texts())
def test_validate_prints_one_line_per_problem_and_never_a_traceback(text: str | bytes) -> None:
    code, out, err, path = run_validate(text)
    assert "Traceback" not in out + err
    expected = expected_problems(path)
    if expected:
        assert code == 1
        # File-level problems name the file themselves; the file is never printed twice.
        assert err.splitlines() == [p if p.startswith(f"{path}:") else f"{path}: {p}" for p in expected]
        assert all(re.match(r"^\S.*?: ", line) for line in err.splitlines())
    else:
        assert (code, err) == (0, "")
        assert out.startswith(f"{path}: ") and "valid" in out


@pytest.mark.unit
def test_validate_names_the_field_of_a_typo_and_exits_1() -> None:
    text = (EXAMPLES / "tiny-grpo.yaml").read_text().replace("samplesPerPrompt: 4", "samplesPerPromt: 4")
    code, _, err, path = run_validate(text)
    assert code == 1
    assert err.splitlines() == [f"{path}: spec.rollout.samplesPerPromt: unknown field "
                                "(check the spelling; fields are camelCase)"]


@pytest.mark.unit
@pytest.mark.parametrize(("text", "fragment"), [
    (b"spec: \xff\xfe\n", "not UTF-8 text"),
    ("spec: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ("spec: [1, 2\n", "not valid YAML"),
])
def test_validate_turns_unreadable_files_into_one_line(text: str | bytes, fragment: str) -> None:
    code, _, err, path = run_validate(text)
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith(f"{path}: ") and fragment in line
