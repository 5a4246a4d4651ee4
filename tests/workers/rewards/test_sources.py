"""Loading reward functions from files and modules, and validating what they return."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from kuberlhf.api import RewardSpec
from kuberlhf_workers.rewards.sources import RewardFunctionError, load_reward_function, make_reward_fn, score

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.unit
def test_example_digits_reward_loads_relative_to_the_spec_dir() -> None:
    fn = load_reward_function("rewards/digits.py:reward", EXAMPLES)
    assert fn(["p", "p"], ["a1", "1234"]) == [0.5, 1.0]


@pytest.mark.unit
def test_files_with_the_same_name_stay_separate_modules(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "reward.py", "def fn(p, c, **kw):\n    return [1.0] * len(c)\n")
    _write(tmp_path / "b" / "reward.py", "def fn(p, c, **kw):\n    return [2.0] * len(c)\n")
    first = load_reward_function("a/reward.py:fn", tmp_path)
    second = load_reward_function(str(tmp_path / "b" / "reward.py") + ":fn", Path("/unused"))
    assert (first(["x"], ["y"]), second(["x"], ["y"])) == ([1.0], [2.0])
    assert first.__module__ != second.__module__


@pytest.mark.unit
def test_reward_file_may_import_a_helper_next_to_it(tmp_path: Path) -> None:
    _write(tmp_path / "r" / "kuberlhf_test_helper_mod.py", "BONUS = 3.0\n")
    _write(
        tmp_path / "r" / "main.py",
        "import kuberlhf_test_helper_mod as h\ndef fn(p, c, **kw):\n    return [h.BONUS for _ in c]\n",
    )
    assert load_reward_function("r/main.py:fn", tmp_path)(["x"], ["y"]) == [3.0]


@pytest.mark.unit
def test_module_reference_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "kuberlhf_test_rewards_pkg" / "__init__.py", "")
    _write(
        tmp_path / "kuberlhf_test_rewards_pkg" / "scoring.py",
        "def length(p, c, **kw):\n    return [len(x) for x in c]\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward_function("kuberlhf_test_rewards_pkg.scoring:length", Path("/unused"))
    assert fn(["a", "b"], ["xyz", ""]) == [3, 0]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("no_colon_here", r"expected 'file\.py:function' or 'module:function'"),
        ("reward.py:", r"expected 'file\.py:function'"),
        ("missing.py:fn", r"file .*missing\.py does not exist"),
        (
            "kuberlhf_no_such_module_xyz:fn",
            r"cannot import module 'kuberlhf_no_such_module_xyz'.*worker image",
        ),
        ("r.py:nope", r".*/r\.py has no function 'nope' \(callables defined there: \['helper', 'reward'\]\)"),
        ("r.py:THRESHOLD", r"'THRESHOLD' in .*r\.py is a float, not a function"),
        ("broken.py:fn", r"importing .*broken\.py failed: ZeroDivisionError"),
    ],
)
def test_bad_references_name_the_field_and_the_problem(tmp_path: Path, ref: str, message: str) -> None:
    _write(tmp_path / "r.py", "THRESHOLD = 0.5\ndef helper():\n    pass\ndef reward(p, c):\n    return []\n")
    _write(tmp_path / "broken.py", "x = 1 / 0\n")
    with pytest.raises(ValueError, match=r"spec\.reward\.function: " + message):
        load_reward_function(ref, tmp_path)


@pytest.mark.unit
def test_make_reward_fn_loads_the_function_source() -> None:
    fn = make_reward_fn(RewardSpec(function="rewards/math_verify.py:reward"), EXAMPLES)
    assert fn(["q", "q"], ["so \\boxed{4}", "\\boxed{5}"], answer=["4", "4"]) == [1.0, 0.0]


@pytest.mark.unit
def test_make_reward_fn_requires_exactly_one_source() -> None:
    with pytest.raises(ValueError, match=r"spec\.reward: set exactly one of function, model or url"):
        make_reward_fn(RewardSpec(), Path("."))
    with pytest.raises(ValueError, match=r"got \['function', 'url'\]"):
        make_reward_fn(RewardSpec(function="a.py:f", url="http://x"), Path("."))


def length_reward(prompts: list[str], completions: list[str], **kw: object) -> list[float]:
    return [float(len(c)) for c in completions]


@pytest.mark.unit
def test_score_passes_extra_columns_and_returns_floats() -> None:
    def by_answer(prompts, completions, answer, level):
        return [int(c == a) + lv for c, a, lv in zip(completions, answer, level, strict=True)]

    out = score(by_answer, ["p", "p"], ["4", "5"], {"answer": ["4", "4"], "level": [1, 2]})
    assert out == [2.0, 2.0]
    assert all(type(x) is float for x in out)
    assert score(lambda p, c: np.array([0.5, 1.5]), ["p", "p"], ["a", "b"]) == [0.5, 1.5]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1.0], r"returned 1 scores for 2 completions"),
        ([1.0, math.nan], r"returned nan at index 1; every score must be a finite number"),
        ([1.0, math.inf], r"returned inf at index 1"),
        ([1.0, "0.5"], r"returned '0\.5' at index 1"),
        ([1.0, None], r"returned None at index 1"),
        (0.5, r"must return a list of floats, got float"),
    ],
)
def test_score_rejects_bad_results_naming_the_function(returned: object, message: str) -> None:
    def bad_reward(prompts, completions, **kw):
        return returned

    with pytest.raises(RewardFunctionError, match=r"reward function .*bad_reward " + message):
        score(bad_reward, ["p", "q"], ["a", "b"])


@pytest.mark.unit
def test_score_wraps_exceptions_from_user_code() -> None:
    def crashing(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match=r"crashing raised KeyError: 'answer'") as info:
        score(crashing, ["p"], ["a"])
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.unit
def test_score_checks_column_lengths_before_calling() -> None:
    with pytest.raises(ValueError, match=r"extra column 'answer' has 1 values for 2 completions"):
        score(length_reward, ["p", "q"], ["a", "b"], {"answer": ["x"]})
    with pytest.raises(ValueError, match=r"1 prompts for 2 completions"):
        score(length_reward, ["p"], ["a", "b"])


def test_make_reward_fn_serves_a_local_reward_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from kuberlhf_workers.rewards.model import RewardModelScorer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    fn = make_reward_fn(RewardSpec(model=str(tmp_path / "rm")), Path("."))
    assert isinstance(fn, RewardModelScorer)
    scores = score(fn, ["p", "p"], ["1 2 3", "the cat"])
    assert len(scores) == 2 and scores[0] != scores[1]
    with pytest.raises(ValueError, match=r"spec\.reward\.model: .*not an existing directory"):
        make_reward_fn(RewardSpec(model=str(tmp_path / "missing")), Path("."))


@pytest.mark.unit
def test_make_reward_fn_wires_url_spec_into_the_reward_client() -> None:
    from kuberlhf_workers.rewards.client import RewardClient

    spec = RewardSpec.model_validate(
        {"url": "http://reward.example:8000", "timeoutSeconds": 5, "maxRetries": 1}
    )
    fn = make_reward_fn(spec, Path("."), secret_token="s3cret")
    assert isinstance(fn, RewardClient)
    assert fn.url.startswith("http://reward.example:8000")
    assert (fn.timeout_s, fn.max_retries, fn.token) == (5.0, 1, "s3cret")


@pytest.mark.unit
def test_relative_reward_file_is_also_found_on_sys_path(tmp_path, monkeypatch):
    """In a cluster the spec lives in a ConfigMap mount; the image ships rewards/ on PYTHONPATH."""
    image_dir = tmp_path / "image"
    (image_dir / "rewards").mkdir(parents=True)
    (image_dir / "rewards" / "lengths.py").write_text(
        "def reward(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(image_dir))
    fn = load_reward_function("rewards/lengths.py:reward", tmp_path / "configmap")
    assert fn(["p"], ["abc"]) == [3.0]
