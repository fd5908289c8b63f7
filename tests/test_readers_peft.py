"""LoRA adapters trained by the Hugging Face Trainer (optim="schedule_free_adamw") with peft.

The checkpoint holds only the adapter (adapter_model.safetensors, adapter_config.json) and the
Trainer's optimizer.pt over the adapter's parameters. The release is an adapter folder that
PeftModel.from_pretrained(base, folder) loads to exactly the x the optimizer's eval() gives.
"""
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_clean, assert_equal_tensors, assert_one_error_line, cli_capped, read, SCRIPTS

pytest.importorskip("peft")
pytest.importorskip("transformers")

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    result = subprocess.run([sys.executable, SCRIPTS / "peft_lora.py", out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, torch.load(out / "expected_x.pt")


@pytest.mark.slow
def test_checkpoint_holds_only_the_adapter(lora_run):
    out, expected = lora_run
    names = {p.name for p in (out / "run" / "checkpoint-3").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert any(".lora_" in k for k in expected) and "base_model.model.model.norm.weight" in expected


@pytest.mark.slow
def test_adapter_folder_loads_to_x(lora_run, run, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    out, expected = lora_run
    ckpt = out / "run" / "checkpoint-3"
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "peft-adapter"
    release = tmp_path / "adapter"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in release.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(out / "base")), str(release))
    assert_equal_tensors(get_peft_model_state_dict(model), expected)
    assert any(not torch.equal(v, read(ckpt / "adapter_model.safetensors")[k]) for k, v in expected.items())


@pytest.mark.slow
def test_check_and_diff_on_the_adapter_folder(lora_run, run, tmp_path):
    out, _ = lora_run
    ckpt = out / "run" / "checkpoint-3"
    release = tmp_path / "adapter"
    assert run("convert", ckpt, release).exit_code == 0
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    result = run("check", ckpt / "adapter_model.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1
    assert run("diff", ckpt).exit_code == 0
    assert run("diff", release, ckpt).exit_code == 0


@pytest.mark.slow
def test_without_the_base_model_param_order_gives_the_order(lora_run, run, tmp_path):
    """The adapter file lists names sorted; without the base model's config the order comes from --param-order
    (or from content alone, when it tells every tensor apart): never a guess."""
    import shutil

    out, expected = lora_run
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(out / "run" / "checkpoint-3", ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "no/such-model-anywhere"
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    result = run("convert", ckpt, tmp_path / "a")
    if result.exit_code == 0:
        assert_equal_tensors(read(tmp_path / "a" / "adapter_model.safetensors"), expected)
    else:
        assert result.exit_code == 2 and "--param-order" in result.stderr and not (tmp_path / "a").exists()
    result = run("convert", ckpt, tmp_path / "b", "--param-order", out / "order.txt")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "b" / "adapter_model.safetensors"), expected)


# ---- PEFT: the base model's config and the adapter config reach transformers and peft only vetted --------

def _adapter_copy(lora_run, tmp_path, edit=None, base_edit=None):
    """A copy of the LoRA run (checkpoint folder and base model), the adapter config and the base
    model's config.json changed by `edit(config, folder)` and `base_edit(config, base)`."""
    out, _ = lora_run
    folder, base = tmp_path / "checkpoint-3", tmp_path / "base"
    shutil.copytree(out / "run" / "checkpoint-3", folder)
    shutil.copytree(out / "base", base)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    new = edit(config, folder) if edit else None
    (folder / "adapter_config.json").write_text(new if isinstance(new, str) else json.dumps(config))
    if base_edit:
        base_config = json.loads((base / "config.json").read_text())
        base_edit(base_config, base)
        (base / "config.json").write_text(json.dumps(base_config))
    return folder


def _custom_code(marker):
    def plant(config, folder):
        config.update(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import LlamaConfig\n"
                                        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n")
    return plant


@pytest.mark.slow
@pytest.mark.parametrize("where", ["base-folder", "adapter-names-its-own-folder"])
def test_peft_base_config_with_custom_code_never_runs(where, lora_run, run, tmp_path):
    """auto_map in the base model's config.json (beside it, a .py file that would run): no prompt, no
    code, `inspect --json` stays JSON, convert names the way forward, and --param-order converts exactly."""
    out, expected = lora_run
    marker = tmp_path / "pwned"
    if where == "base-folder":
        folder = _adapter_copy(lora_run, tmp_path, base_edit=_custom_code(marker))
    else:
        def own(config, folder):
            config["base_model_name_or_path"] = str(folder)
            base = json.loads((out / "base" / "config.json").read_text())
            _custom_code(marker)(base, folder)
            (folder / "config.json").write_text(json.dumps(base))
        folder = _adapter_copy(lora_run, tmp_path, own)
    report = subprocess.run([sys.executable, "-m", "sfckpt", "inspect", str(folder), "--json"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert "[y/N]" not in report.stdout + report.stderr and "trust_remote_code" not in report.stdout
    if report.returncode == 0:
        json.loads(report.stdout)
    else:
        assert_one_error_line(report, "custom code", "--param-order")
    release = tmp_path / "release"
    result = run("convert", folder, release)
    assert_clean(result, release)
    assert "custom code" in result.stderr and "--param-order" in result.stderr
    assert run("convert", folder, release, "--param-order", out / "order.txt").exit_code == 0
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)
    assert not marker.exists()


@pytest.mark.slow
def test_peft_base_config_from_the_hugging_face_cache(lora_run, tmp_path):
    """A model id as the base: its config.json is read from the local cache (snapshots/<rev>/config.json,
    a link into blobs/), nothing downloaded, and the order rebuilt from it converts exactly."""
    out, expected = lora_run
    repo = tmp_path / "hub" / "models--local--tiny-llama"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    shutil.copy(out / "base" / "config.json", repo / "blobs" / "0f1e2d")
    (repo / "snapshots" / "abc123" / "config.json").symlink_to("../../blobs/0f1e2d")
    folder = _adapter_copy(lora_run, tmp_path, lambda c, f: c.update(base_model_name_or_path="local/tiny-llama"))
    release = tmp_path / "release"
    proc = cli_capped("convert", folder, release, env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)


@pytest.mark.slow
def test_peft_base_config_layer_count_is_bounded(lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, base_edit=lambda c, b: c.update(num_hidden_layers=200_000))
    start = time.monotonic()
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    assert "num_hidden_layers = 200000" in result.stderr and "SFCKPT_MAX_LAYERS" in result.stderr
    assert time.monotonic() - start < 30


@pytest.mark.slow
@pytest.mark.parametrize("field,value,fragment", [
    ("target_modules", r"^(([a-z_.0-9])+)+Q$", "nests a quantifier"),
    ("target_modules", r"[a-z.]*[a-z.]*[a-z.]*[a-z.]*[a-z.]*Q", "quantifiers"),
    ("target_modules", r"(qq|k)*_proj", "repeats a choice"),
    ("target_modules", r"(q)_proj\1", "backreference"),
    ("exclude_modules", r"(a?){40}a{40}", "nests a quantifier"),
    ("modules_to_save", [r"(x+x+)+y"], "nests a quantifier"),
    ("layers_pattern", r"(l+)+", "nests a quantifier"),
    ("rank_pattern", {r"(.*a){20}": 8}, "nests a quantifier"),
    ("target_modules", "(", "not a regular expression"),
    ("modules_to_save", "norm", "not a list"),
    ("rank_pattern", [1], "not a map"),
    # any other field of module names peft matches as a regex (IA3's, or a future type's)
    ("feedforward_modules", r"^(([a-z_.0-9])+)+Q$", "nests a quantifier"),
], ids=["nested", "five-repeats", "repeated-choice", "backreference", "optional-repeats", "modules_to_save",
        "layers_pattern", "rank_pattern", "unparsable", "modules_to_save-str", "rank_pattern-list", "other-modules"])
def test_peft_regexes_that_could_backtrack_are_refused(field, value, fragment, lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, lambda c, f: c.update({field: value}))
    start = time.monotonic()
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    assert field in result.stderr and fragment in result.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("pattern", [
    r".*\.(q_proj|v_proj)", r"^(?!.*vision).*\.(q_proj|k_proj|v_proj)$", r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", "all-linear",
])
def test_honest_target_module_patterns_pass_the_rule(pattern):
    from sfckpt.readers.hf_model import vet_pattern

    vet_pattern(pattern, "target_modules", "adapter_config.json", "hint")


@pytest.mark.slow
@pytest.mark.parametrize("edit,fragment", [
    (lambda c, f: c.update(base_model_name_or_path=123), "base_model_name_or_path 123"),
    (lambda c, f: c.update(base_model_name_or_path=["a", "b"]), "base_model_name_or_path"),
    (lambda c, f: c.update(base_model_name_or_path="a\x00b"), "base_model_name_or_path"),
    (lambda c, f: c.update(peft_type="NO_SUCH"), "peft_type"),
    (lambda c, f: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda c, f: c.update(auto_mapping={"base_model_class": "pipeline"}), "not a model class"),
    (lambda c, f: c.update(modules_to_save=["norm"] * 10_001), "SFCKPT_MAX_PATTERNS"),
    (lambda c, f: c.update(target_modules=["q_proj"] * 10_001), "SFCKPT_MAX_PATTERNS"),
    (lambda c, f: c.update(target_modules=[1]), "not a list of names"),
    (lambda c, f: c.update(layer_replication=[[0, 2]] * 600), "SFCKPT_MAX_LAYERS"),
    (lambda c, f: c.update(layer_replication=[[0, 10**9]]), "SFCKPT_MAX_LAYERS"),
    (lambda c, f: c.update(layer_replication=[[0]]), "layer_replication"),
    # XLORA loads the adapters it names (paths or hub ids) with peft's own file access
    (lambda c, f: c.update(peft_type="XLORA", hidden_size=16, adapters={"0": str(f)}), "rebuilds the order only for"),
    (lambda c, f: c.update(megatron_config={"x": 1}, megatron_core="antigravity"), "megatron_config"),
    # BOFT compiles a C++ extension when its layers are built
    (lambda c, f: c.update(peft_type="BOFT", boft_block_size=4, boft_block_num=0), "rebuilds the order only for"),
], ids=["number", "list", "nul", "peft_type", "deep", "pipeline", "many-patterns", "many-targets", "targets-int",
        "replication-many", "replication-huge", "replication-odd", "xlora", "megatron", "boft"])
def test_peft_adapter_config_nonsense_is_exit_2(edit, fragment, lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, edit)
    for command in ("convert", "inspect", "diff"):
        args = (command, folder, tmp_path / "x") if command == "convert" else (command, folder)
        result = run(*args)
        assert_clean(result, tmp_path / "x")
        assert fragment in result.stderr


@pytest.mark.slow
def test_peft_base_model_not_at_hand_says_how_to_go_on(lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, lambda c, f: c.update(base_model_name_or_path="nobody/no-such-model"))
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    for fragment in ("nor in the local Hugging Face cache", "--param-order",
                     "huggingface-cli download nobody/no-such-model config.json"):
        assert fragment in result.stderr


@pytest.mark.slow
def test_peft_without_peft_installed_names_the_extra(lora_run, run, tmp_path, monkeypatch):
    folder = _adapter_copy(lora_run, tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    assert "sfckpt[hf]" in result.stderr and "--param-order" in result.stderr
