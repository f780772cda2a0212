"""Hostile model settings: a missing directory, a hub id on a machine without network, a model that needs
its own code, a broken config.json. Each fails within seconds with exit code 2 and one message naming
model.name_or_path (or model.trust_remote_code) and the fix; nothing here reaches beyond this machine."""

import json
import shutil
import socket
import time

import pytest
from huggingface_hub import constants

from memft.train.models import ASSETS


def refused(cli, *args, expected=(), seconds=10) -> str:
    start = time.perf_counter()
    code, out, err = cli(*args)
    assert time.perf_counter() - start < seconds
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err) < 1_000, err
    for part in expected:
        assert part in err, err
    return err


@pytest.mark.parametrize("name", ["/nonexistent/model", "./my-model", "../my-model", "~/no-such-model-dir",
                                  "runs/missing-model"])
def test_a_missing_local_directory_fails_at_once(tmp_path, monkeypatch, cli, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # 'runs/missing-model' is a path under an existing directory, not a hub id
    for command in ("validate", "finetune"):
        refused(cli, command, "quickstart", f"model.name_or_path={name}", f"train.output_dir={tmp_path / 'run'}",
                expected=(f"model.name_or_path: local directory '{name}' does not exist",), seconds=5)


def test_a_file_is_not_a_model_directory(tmp_path, cli):
    refused(cli, "validate", "quickstart", f"model.name_or_path={ASSETS / 'tiny-llama' / 'config.json'}",
            expected=("is a file; point it at the directory that holds config.json",))


def test_a_hub_id_while_offline_fails_at_once(monkeypatch, tmp_path, cli):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refused(cli, "validate", "quickstart", "model.name_or_path=some-org/some-model",
            expected=("'some-org/some-model' is not a local directory and not in the local Hugging Face cache",
                      "HF_HUB_OFFLINE=1 forbids downloading it"), seconds=5)


def _refusing_endpoint() -> str:
    """An address where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def silent_endpoint():
    """An address that accepts connections and never answers: only the probe's timeout ends the wait."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_hub_fails_within_seconds(monkeypatch, tmp_path, cli, silent_endpoint, kind):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", _refusing_endpoint() if kind == "refused" else silent_endpoint)
    for command in ("validate", "finetune"):
        refused(cli, command, "quickstart", "model.name_or_path=some-org/some-model",
                f"train.output_dir={tmp_path / 'run'}",
                expected=("not in the local Hugging Face cache", "this machine looks offline",
                          "Point model.name_or_path at a local directory"))


def _cache_tiny_llama(cache, repo="memft-test/tiny"):
    """The bundled model laid out as a download in a Hugging Face cache."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(ASSETS / "tiny-llama", entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return repo


@pytest.mark.parametrize("offline", [True, False])
def test_a_cached_hub_model_loads_without_network(monkeypatch, tmp_path, cli, offline):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", _refusing_endpoint())
    repo = _cache_tiny_llama(tmp_path / "hub")
    code, out, err = cli("validate", "quickstart", f"model.name_or_path={repo}")
    assert code == 0 and "valid finetune recipe" in out, err


def _model_dir(tmp_path, config) -> str:
    path = tmp_path / "custom-model"
    path.mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


CUSTOM = {"model_type": "mysterious_lm", "hidden_size": 64,
          "auto_map": {"AutoConfig": "configuration_mysterious.MysteriousConfig",
                       "AutoModelForCausalLM": "modeling_mysterious.MysteriousForCausalLM"}}


@pytest.mark.parametrize("command", ["validate", "finetune", "memory"])
def test_a_model_with_its_own_code_names_trust_remote_code(tmp_path, cli, command):
    path = _model_dir(tmp_path, CUSTOM)
    refused(cli, command, "quickstart", f"model.name_or_path={path}", f"train.output_dir={tmp_path / 'run'}",
            expected=(f"model.name_or_path: '{path}' needs its own model code", "auto_map",
                      "set model.trust_remote_code: true", "runs Python files from that directory"))


def test_an_unknown_model_type_suggests_upgrading_or_trusting_its_code(tmp_path, cli):
    path = _model_dir(tmp_path, {"model_type": "mysterious_lm"})
    refused(cli, "validate", "quickstart", f"model.name_or_path={path}",
            expected=("model_type 'mysterious_lm', which transformers", "upgrade transformers",
                      "model.trust_remote_code: true"))


def test_memory_estimates_of_an_unknown_architecture_stay_short(tmp_path, cli):
    path = _model_dir(tmp_path, CUSTOM)
    refused(cli, "memory", "quickstart", "--config", f"{path}/config.json",
            expected=("model_type 'mysterious_lm' is not an architecture transformers", "needs its own code"))


@pytest.mark.parametrize("config, expected", [
    ("[1, 2]", "holds a list, not a JSON object"),
    ('{"model_type": "llama", "max_position_embeddings": 1', "is not a valid JSON file"),
    ({"model_type": "llama", "max_position_embeddings": "long"}, "max_position_embeddings"),
    ({"model_type": ["llama"]}, "model.trust_remote_code: true"),
])
def test_a_broken_config_json_is_one_message(tmp_path, cli, config, expected):
    path = _model_dir(tmp_path, config)
    refused(cli, "validate", "quickstart", f"model.name_or_path={path}", expected=("model.name_or_path", expected))
