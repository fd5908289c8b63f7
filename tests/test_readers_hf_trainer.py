"""Hugging Face Trainer `checkpoint-N/` folders, made by a real Trainer run, to release folders `from_pretrained` loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sfckpt
from conftest import assert_clean, assert_equal_tensors, cli_capped, read, SCRIPTS

pytestmark = pytest.mark.slow  # every test here reads a Hugging Face Trainer run in a child process


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    pytest.importorskip("transformers")

    def make(optim="schedule_free_adamw", evaluate=False):
        out = tmp_path_factory.mktemp(f"hf-{optim}-{evaluate}")
        result = subprocess.run([sys.executable, SCRIPTS / "hf_trainer.py", out, optim, "eval" if evaluate else "train"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return out / "checkpoint-3", torch.load(out / "expected_x.pt")

    return make


@pytest.mark.parametrize("optim", ["schedule_free_adamw", "schedule_free_sgd"])
def test_hf_trainer_folder_to_release_folder(optim, hf_run, run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, expected = hf_run(optim)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "huggingface-trainer"
    assert "Hugging Face Trainer" in report["mapping"]["method"] and report["mapping"]["untrained_parameters"] == []
    assert [g["weight_decay"] for g in report["groups"]] == [0.1, 0.0]
    release = tmp_path / "release"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in release.iterdir())
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(names)
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert_equal_tensors(model.state_dict(), expected)  # tied lm_head restored by transformers
    assert AutoTokenizer.from_pretrained(str(release)) is not None
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("check", ckpt / "model.safetensors", "--ckpt", ckpt).exit_code == 1  # the folder's own weights are y
    assert run("check", ckpt, "--ckpt", ckpt).exit_code == 1  # WEIGHTS are judged as they are, never reconstructed


def test_hf_checkpoint_after_evaluation_holds_x(hf_run, run, tmp_path):
    ckpt, expected = hf_run(evaluate=True)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["params_hold"] == "x"
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_hf_sharded_release_and_output_inside_input(hf_run, run, tmp_path):
    ckpt, expected = hf_run()
    assert run("convert", ckpt, tmp_path / "rel", "--max-shard-size", "10KB").exit_code == 0
    from transformers import AutoModelForCausalLM

    assert_equal_tensors(AutoModelForCausalLM.from_pretrained(str(tmp_path / "rel")).state_dict(), expected)
    result = run("convert", ckpt, ckpt / "release")
    assert result.exit_code == 2 and "inside the input folder" in result.stderr
    assert not (ckpt / "release").exists()


def test_hf_without_transformers_names_the_extra(hf_run, run, tmp_path, monkeypatch):
    ckpt, _ = hf_run()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "sfckpt[hf]" in result.stderr


def test_hf_folder_with_pytorch_model_bin(hf_run, run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    ckpt, expected = hf_run()
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(ckpt, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert run("convert", folder, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_diff_of_a_trainer_folder_uses_its_x(hf_run, run, tmp_path):
    ckpt, _ = hf_run()
    assert run("convert", ckpt, tmp_path / "rel").exit_code == 0
    same = json.loads(run("diff", tmp_path / "rel", ckpt, "--json").stdout)["summary"]
    assert same["differ"] == 0 and same["compared"] > 0
    gap = json.loads(run("diff", ckpt, "--json").stdout)["summary"]
    assert gap["differ"] > 0


# ---- Hugging Face Trainer folders: config.json never brings code, and stays cheap ------------------

@pytest.fixture(scope="module")
def trainer_folder(hf_run):
    return hf_run()[0]  # one Trainer run for the module: it takes seconds


def _trainer_copy(trainer_folder, tmp_path, edit):
    import json
    import shutil

    ckpt = trainer_folder
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    new = edit(config, folder)
    (folder / "config.json").write_text(new if isinstance(new, str) else json.dumps(config))
    return folder


def test_trainer_config_with_custom_code_is_refused_without_a_prompt(trainer_folder, run, tmp_path):
    marker = tmp_path / "pwned"

    def custom(config, folder):
        config.update(model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig"}, architectures=["EvilModel"])
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import PretrainedConfig\n"
                                        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_model'\n")

    folder = _trainer_copy(trainer_folder, tmp_path, custom)
    for command in ("inspect", "convert"):
        result = run(command, folder, tmp_path / "x.safetensors") if command == "convert" else run(command, folder)
        assert_clean(result, tmp_path / "x.safetensors")
        assert "--param-order" in result.stderr and "custom code" in result.stderr
        assert "trust_remote_code" not in result.stdout and "[y/N]" not in result.stdout
    assert not marker.exists()


@pytest.mark.parametrize("edit,fragment", [
    (lambda c, f: c.update(architectures=[123]), "architectures"),
    (lambda c, f: c.update(model_type="no_such_model"), "does not ship"),
    (lambda c, f: c.update(n_layer=20000, num_hidden_layers=20000), "SFCKPT_MAX_LAYERS"),
    (lambda c, f: "[1, 2]", "not an object"),
    (lambda c, f: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda c, f: '{"a": ' + "9" * 5000 + "}", "not valid JSON"),
], ids=["architectures-int", "unknown-type", "huge-n_layer", "list", "deep", "5000-digits"])
def test_trainer_config_nonsense_is_exit_2(edit, fragment, trainer_folder, tmp_path):
    from sfckpt.readers.hf_trainer import load_config

    folder = _trainer_copy(trainer_folder, tmp_path, edit)
    with pytest.raises(sfckpt.InputError) as info:
        load_config(folder)
    assert fragment in str(info.value)


# ---- Hugging Face Trainer: the model class config.json names must be a model built from that config ------

@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c.update(architectures=["pipeline"]), "not a model class"),
    (lambda c: c.update(architectures=["AutoModel"]), "not a model class"),
    (lambda c: c.update(architectures=["BertModel"]), "not built from a LlamaConfig"),
    (lambda c: c.update(architectures=["os.system"]), "not a model class"),
    (lambda c: c.update(hidden_size=7), "cannot be"),
    (lambda c: c.update(configuration_files=["config.9.json"]), "configuration_files"),
    (lambda c: c.update(depths=[2, 200_000]), "depths = 200000"),
    (lambda c: c.update(model_type="llama", auto_map={"AutoConfig": "x.Y"}), "custom code"),
    # a list's length is a count too: ResNet builds one stage per entry of depths
    (lambda c: c.update(model_type="resnet", architectures=["ResNetForImageClassification"], depths=[1] * 1001,
                        hidden_sizes=[8] * 1001, embedding_size=8), "list of 1001 entries"),
    (lambda c: c.update(num_labels=200_000), "num_labels = 200000"),
], ids=["pipeline", "AutoModel", "BertModel", "dotted", "heads-do-not-divide", "configuration_files", "depths",
        "auto_map", "depths-list", "labels"])
def test_trainer_config_that_builds_no_model_is_exit_2(edit, fragment, trainer_folder, run, tmp_path):
    from sfckpt.readers import hf_trainer

    folder = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sfckpt.InputError) as info:
        hf_trainer.parameter_order(folder)
    assert fragment in str(info.value)
    assert info.value.option == "param_order" or "SFCKPT_MAX_" in str(info.value)
    assert_clean(run("convert", folder, tmp_path / "x"), tmp_path / "x", allow_success=True)


def test_library_logs_quoting_the_config_are_printed_escaped(trainer_folder, tmp_path):
    """transformers logs warnings that quote config values with its own handler (raw text on stderr);
    while sfckpt hands it a config, its records are printed through the escaping edge instead."""
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    forged = "0\n::error file=README.md,title=sfckpt check::FORGED\n\x1b]0;pwned\x07"
    config["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "linear", "factor": forged}
    (folder / "config.json").write_text(json.dumps(config))
    for args in (("inspect", folder), ("inspect", "--json", folder), ("convert", folder, tmp_path / "x")):
        proc = cli_capped(*args, env={"GITHUB_ACTIONS": "true"})
        for stream in (proc.stdout, proc.stderr):
            assert "\x1b" not in stream and "\x07" not in stream
            assert not [line for line in stream.splitlines() if line.lstrip().startswith("::")
                        and not line.startswith("::error title=sfckpt")], stream
        assert "FORGED" not in proc.stderr or "\\n\\x3a:error" in proc.stderr or "\\n::error" in proc.stderr


@pytest.mark.parametrize("key", ["attn_implementation", "experts_implementation"])
def test_config_choosing_a_hub_kernel_reaches_no_hub(key, trainer_folder, tmp_path):
    """`attn_implementation: "org/repo"` makes transformers fetch a kernel from the hub and import its code
    (with the `kernels` package installed); sfckpt drops such keys, which change no parameter."""
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = "kernels-community/flash-attn2"
    (folder / "config.json").write_text(json.dumps(config))
    # A spy on transformers' own door to the hub's kernels (it would download and import code)
    code = ("import sys\nimport transformers.integrations.hub_kernels as hub\nasked = []\n"
            "def spy(*args, **kwargs):\n    asked.append(args)\n    raise RuntimeError('no hub here')\n"
            "hub.get_kernel = spy\nfrom sfckpt.cli import main\ntry:\n    main()\nfinally:\n"
            "    sys.stderr.write('hub kernel asked\\n' if asked else '')\n")
    proc = subprocess.run([sys.executable, "-c", code, "inspect", str(folder)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hub kernel asked" not in proc.stderr


def test_trainer_state_that_is_not_an_object(trainer_folder, run, tmp_path):
    folder = _trainer_copy(trainer_folder, tmp_path, lambda c, f: None)
    (folder / "trainer_state.json").write_text("[1, 2]")
    result = run("inspect", folder)
    assert_clean(result, tmp_path / "none", allow_success=True)
