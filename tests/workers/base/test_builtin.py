"""builtin:tiny is built locally, deterministically, loads with the Auto classes, and caches safely."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kuberlhf_workers.base import builtin
from kuberlhf_workers.base.builtin import BuiltinModel, resolve_model


def test_tiny_model_loads_with_auto_classes_and_consistent_special_tokens(tiny_model_dir: Path) -> None:
    assert (tiny_model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert len(ids) == 3 and None not in ids
    for config in (model.config, model.generation_config):
        assert config.eos_token_id == tokenizer.eos_token_id
        assert config.pad_token_id == tokenizer.pad_token_id
    encoded = tokenizer("What is 12 + 5?", return_tensors="pt")
    logits = model(**encoded).logits
    assert logits.shape == (1, encoded.input_ids.shape[1], len(tokenizer))


def test_tiny_tokenizer_round_trips_text_and_renders_chat(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Count: 7 8 9, what is 40 + 2? Ünïcode too"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer("The answer is 17.").input_ids) < len("The answer is 17.") / 2
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|bos|>user: hello<|eos|>assistant:"


def test_building_twice_gives_identical_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = resolve_model("builtin:tiny", tmp_path)
    assert again != tiny_model_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_cached_model_is_reused_without_rebuilding(tiny_model_dir: Path, monkeypatch) -> None:
    def must_not_build(dest: Path) -> None:
        raise AssertionError("rebuilt a cached model")

    version = builtin.BUILTIN_MODELS["tiny"].version
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tiny", BuiltinModel(version, must_not_build))
    assert resolve_model("builtin:tiny", tiny_model_dir.parent) == tiny_model_dir


def test_default_cache_dir_follows_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KUBERLHF_CACHE", str(tmp_path))
    built: list[Path] = []
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake", BuiltinModel("3", built.append))
    assert resolve_model("builtin:fake") == tmp_path / "fake-3"
    assert len(built) == 1


def test_concurrent_builders_leave_one_complete_model(tmp_path: Path, monkeypatch) -> None:
    def slow_build(dest: Path) -> None:
        (dest / "part1").write_text("a")
        time.sleep(0.2)
        (dest / "part2").write_text(threading.current_thread().name)

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake", BuiltinModel("1", slow_build))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model("builtin:fake", tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "fake-1"] * 4
    assert sorted(p.name for p in (tmp_path / "fake-1").iterdir()) == ["part1", "part2"]
    assert [p.name for p in tmp_path.iterdir()] == ["fake-1"]  # no staging directories left


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    def broken(dest: Path) -> None:
        (dest / "half").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake", BuiltinModel("1", broken))
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("builtin:fake", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path


def test_unknown_builtin_names_the_field_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"spec\.model\.actor: unknown builtin model 'builtin:huge'.*builtin:tiny"
    ):
        resolve_model("builtin:huge", tmp_path)


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"spec\.model\.critic: .*not an existing directory"):
        resolve_model(str(tmp_path / "nope"), field="spec.model.critic")


def test_hub_id_not_in_local_cache_says_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ValueError, match=r"spec\.model\.actor: model 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"
    ):
        resolve_model("no-such-org/no-such-model")


def test_tiny_model_generates_within_vocabulary(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    out = model.generate(**tokenizer("Count: 1 2 3", return_tensors="pt"), max_new_tokens=8)
    assert out.shape[1] <= len(tokenizer("Count: 1 2 3").input_ids) + 8
    assert int(out.max()) < len(tokenizer)


def test_hub_id_resolves_to_its_cached_snapshot(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("acme/tiny") == snapshot


def test_tiny_model_fits_vllm_cpu_attention_kernels(tiny_model_dir: Path) -> None:
    import json

    from kuberlhf_workers.rollout.vllm_engine import check_cpu_head_size

    check_cpu_head_size(json.loads((tiny_model_dir / "config.json").read_text()), str(tiny_model_dir))


def test_the_planners_builtin_shapes_match_the_models_built_here(tiny_model_dir: Path) -> None:
    # kuberlhf.modelsize cannot import the recipes (the API layer sits below the workers): it copies
    # their shapes, and this keeps the copy honest.
    import json

    from kuberlhf.modelsize import BUILTIN_SHAPES, parameters_of

    config = json.loads((tiny_model_dir / "config.json").read_text())
    expected = BUILTIN_SHAPES["tiny"]
    assert {k: config[k] for k in expected} == expected
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert parameters_of(config) == sum(p.numel() for p in model.parameters())


# File listings of real hub repos (as the hub's API lists them), which `snapshot_download` filters with
# huggingface_hub's own `filter_repo_objects`.
HUB_REPOS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": (
        [".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
         *(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)), "model.safetensors.index.json",
         "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"],
        {"config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"},
    ),
    "Qwen/Qwen2.5-7B-Instruct": (
        [".gitattributes", "LICENSE", "README.md", "config.json", "generation_config.json", "merges.txt",
         *(f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)), "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "vocab.json"],
        {"config.json", "generation_config.json", "merges.txt", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "vocab.json"},
    ),
    "mistralai/Mistral-7B-v0.1": (  # SentencePiece, and the weights twice (safetensors and .bin)
        [".gitattributes", "README.md", "config.json", "generation_config.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin",
         "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
         "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"],
        {"config.json", "generation_config.json", "model.safetensors.index.json",
         "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
         "tokenizer_config.json"},
    ),
}


def hub_selection(files: list[str], tokenizer_only: bool) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = builtin.hub_patterns(tokenizer_only)
    return set(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


@pytest.mark.parametrize("repo", sorted(HUB_REPOS))
def test_the_driver_fetches_a_hub_models_tokenizer_and_config_files_and_no_weights(repo: str) -> None:
    files, tokenizer_files = HUB_REPOS[repo]
    assert hub_selection(files, tokenizer_only=True) == tokenizer_files


def test_the_workers_still_fetch_every_weight_file_of_a_hub_model() -> None:
    files, _ = HUB_REPOS["meta-llama/Meta-Llama-3-8B-Instruct"]
    fetched = hub_selection(files, tokenizer_only=False)
    assert {f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)} <= fetched
    assert not any(f.startswith("original/") for f in fetched)


def test_the_tokenizer_files_alone_load_the_same_tokenizer_from_the_hub_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A hub cache holding only what the tokenizer patterns select from builtin:tiny's files, laid out
    as huggingface_hub lays one out: the driver's tokenizer loads from it and encodes as the model's."""
    import shutil

    repo = tmp_path / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    selected = hub_selection(sorted(p.name for p in tiny_model_dir.iterdir()), tokenizer_only=True)
    assert "model.safetensors" not in selected and "config.json" in selected
    for name in selected:
        shutil.copy(tiny_model_dir / name, snapshot / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = resolve_model("acme/tiny", tokenizer_only=True)
    assert folder == snapshot
    text = [{"role": "user", "content": "What is 12 + 5?"}]
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(tiny_model_dir)
    assert ours.apply_chat_template(text, tokenize=False) == theirs.apply_chat_template(text, tokenize=False)
    assert ours("Count: 1 2 3").input_ids == theirs("Count: 1 2 3").input_ids
    assert (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id)


def test_tokenizer_only_returns_builtin_and_local_models_whole(tiny_model_dir: Path) -> None:
    assert resolve_model("builtin:tiny", tiny_model_dir.parent, tokenizer_only=True) == tiny_model_dir
    assert resolve_model(str(tiny_model_dir), tokenizer_only=True) == tiny_model_dir
