"""Inputs that once reached transformers' custom-code prompt, ran unbounded work, or ended in
"internal error" (issue #19): each is built from a real saved checkpoint with one field tampered,
and must now give exit 2 with one `error:` line (or, where the input is honest, the exact x)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import sfckpt
import trainers
from conftest import FIXTURES, assert_equal_tensors, read
from test_hardening import assert_clean
from test_hostile import Crafted, _clean_exit, _cli

DS = FIXTURES / "deepspeed"


# ---- PEFT: the base model's config and the adapter config reach transformers and peft only vetted --------

from test_peft import lora_run  # noqa: E402,F401  (the module-scoped LoRA Trainer run)


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
        _clean_exit(report, "custom code", "--param-order")
    release = tmp_path / "release"
    result = run("convert", folder, release)
    assert_clean(result, release)
    assert "custom code" in result.stderr and "--param-order" in result.stderr
    assert run("convert", folder, release, "--param-order", out / "order.txt").exit_code == 0
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)
    assert not marker.exists()


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
    proc = _cli("convert", folder, release, env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)


def test_peft_base_config_layer_count_is_bounded(lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, base_edit=lambda c, b: c.update(num_hidden_layers=200_000))
    start = time.monotonic()
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    assert "num_hidden_layers = 200000" in result.stderr and "SFCKPT_MAX_LAYERS" in result.stderr
    assert time.monotonic() - start < 30


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


def test_peft_base_model_not_at_hand_says_how_to_go_on(lora_run, run, tmp_path):
    folder = _adapter_copy(lora_run, tmp_path, lambda c, f: c.update(base_model_name_or_path="nobody/no-such-model"))
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    for fragment in ("nor in the local Hugging Face cache", "--param-order",
                     "huggingface-cli download nobody/no-such-model config.json"):
        assert fragment in result.stderr


def test_peft_without_peft_installed_names_the_extra(lora_run, run, tmp_path, monkeypatch):
    folder = _adapter_copy(lora_run, tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    result = run("convert", folder, tmp_path / "x")
    assert_clean(result, tmp_path / "x")
    assert "sfckpt[hf]" in result.stderr and "--param-order" in result.stderr


# ---- Hugging Face Trainer: the model class config.json names must be a model built from that config ------

from test_containers import hf_run  # noqa: E402,F401


@pytest.fixture(scope="module")
def trainer_folder(hf_run):
    return hf_run()[0]


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
        proc = _cli(*args, env={"GITHUB_ACTIONS": "true"})
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


# ---- DeepSpeed: fields of the rank files checked where they are read ----------------------------------------

def _rank0(ckpt):
    return next((ckpt / "global_step3").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def _every_rank(ckpt):
    return sorted((ckpt / "global_step3").glob("*_optim_states.pt"))


def _paddings(value):
    return lambda o: o["optimizer_state_dict"].__setitem__("param_alignment_paddings", value)


def _base_groups(change):
    return lambda o: [change(g) for g in o["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]]


def _z_to(dtype):
    def change(o):
        state = o["optimizer_state_dict"]["base_optimizer_state"]["state"]
        for entry in state.values():
            entry["z"] = entry["z"].to(dtype)
    return change


DEEPSPEED = {
    "paddings NaN": ("zero2-aligned-bf16", _every_rank, _paddings([[float("nan"), 0], [3, 0]]), "param_alignment_paddings"),
    "paddings 5, -5": ("zero2-aligned-bf16", _every_rank, _paddings([[5, -5], [3, 0]]), "param_alignment_paddings"),
    "paddings text": ("zero2-aligned-bf16", _every_rank, _paddings([["5", 0], [3, 0]]), "param_alignment_paddings"),
    "params [[0]]": ("zero2-fp32", _every_rank, _base_groups(lambda g: g.__setitem__("params", [[0]])), "params"),
    "params [0.5]": ("zero2-fp32", _every_rank, _base_groups(lambda g: g.__setitem__("params", [0.5])), "params"),
    "partition_count []": ("zero2-fp32", _every_rank,
                           lambda o: o["optimizer_state_dict"].__setitem__("partition_count", []), "partition_count"),
    "partition_count [0]": ("zero2-fp32", _every_rank,
                            lambda o: o["optimizer_state_dict"].__setitem__("partition_count", [0, 0]), "partition_count"),
    "z bfloat16": ("zero2-fp32", _every_rank, _z_to(torch.bfloat16), "float32"),
    "z bfloat16 at ZeRO-3": ("zero3-fp32", _every_rank, lambda o: [e.__setitem__("z", e["z"].to(torch.bfloat16)) for e in
                             o["optimizer_state_dict"]["optimizer_state_dict"]["state"].values()], "float32"),
    "group_paddings NaN": ("bf16-optimizer", _every_rank,
                           lambda o: o["optimizer_state_dict"].__setitem__("group_paddings", [float("nan")]), "group_paddings"),
}


@pytest.mark.parametrize("damage", sorted(DEEPSPEED))
def test_deepspeed_fields_are_checked_where_read(damage, run, tmp_path):
    case, files, change, fragment = DEEPSPEED[damage]
    ckpt = tmp_path / case
    shutil.copytree(DS / case, ckpt)
    for path in files(ckpt):
        obj = torch.load(path, weights_only=False)  # written by this test suite's own fixtures script
        change(obj)
        torch.save(obj, path)
    out = tmp_path / "x.safetensors"
    for args in (("convert", ckpt, out), ("inspect", ckpt), ("diff", ckpt)):
        result = run(*args)
        assert_clean(result, out)
        assert fragment in result.stderr


# ---- torch.distributed.checkpoint: planner_data is checked before it builds the nested state ----------------

def _dcp(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    return tmp_path / "dcp"


def _conflict(paths):
    first, second = sorted(k for k in paths if k.startswith("model."))[:2]
    paths[second] = paths[first] + ("deeper",)


def _same(paths):
    first, second = sorted(k for k in paths if k.startswith("model."))[:2]
    paths[second] = paths[first]


@pytest.mark.parametrize("change,fragment", [
    (_conflict, "planner_data places two entries"), (_same, "planner_data places two entries"),
    (lambda p: p.__setitem__(sorted(p)[0], ("model",) + ("x",) * 100_000), "SFCKPT_MAX_NESTING"),
    (lambda p: p.__setitem__(sorted(p)[0], ("optim", "param_groups", 10**6, "lr")), "param_groups"),
], ids=["prefix-of-another", "same-path", "100000-deep", "list-index-past-the-end"])
def test_dcp_planner_data_is_checked(change, fragment, run, tmp_path):
    import pickle

    folder = _dcp(tmp_path)
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md.planner_data)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    for command in ("inspect", "convert"):
        args = (command, folder, tmp_path / "x") if command == "convert" else (command, folder)
        result = run(*args)
        assert_clean(result, tmp_path / "x")
        assert fragment in result.stderr


# ---- optimizer state of the wrong shape, where no family or a normaliser reads it ----------------------------

def _saved(tmp_path, change):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    osd = opt.state_dict()
    change(osd)
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    return tmp_path / "c.pt"


def _unknown_family_with_int_key(osd):
    for g in osd["param_groups"]:
        g.pop("betas")
        g[7] = 1.0


@pytest.mark.parametrize("change", [
    _unknown_family_with_int_key,
    lambda o: o.update(heavyball={"x": 1}, state=list(o["state"].values())),
    lambda o: o.update(heavyball={"x": 1}, state={0: {0: [1, 2]}}),
    lambda o: o.update(heavyball={"x": 1}, param_groups=5),
    lambda o: o.__setitem__("param_groups", [1, 2]),
], ids=["int-key-no-family", "heavyball-state-list", "heavyball-view-not-a-dict", "heavyball-groups-int", "groups-ints"])
def test_optimizer_state_of_the_wrong_shape_is_exit_2(change, run, tmp_path):
    path = _saved(tmp_path, change)
    for command in ("inspect", "convert", "diff"):
        args = (command, path, tmp_path / "x") if command == "convert" else (command, path)
        assert_clean(run(*args), tmp_path / "x")


@pytest.mark.parametrize("groups", [[1, 2], [[0]], "x", [{"params": 5}]], ids=["ints", "lists", "text", "params-int"])
def test_pytorch_optimizer_wrapper_with_odd_base_groups_is_exit_2(groups, run, tmp_path):
    pytest.importorskip("pytorch_optimizer")
    model = trainers.MLP()
    opt = trainers.train(model, "pto-wrapper")
    osd = opt.state_dict()
    osd["base_optimizer"]["param_groups"] = groups
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        args = (command, tmp_path / "c.pt", tmp_path / "x") if command == "convert" else (command, tmp_path / "c.pt")
        assert_clean(run(*args), tmp_path / "x")


# ---- names that are not text, and limits raised far -----------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "convert", "diff", "check"])
def test_lone_surrogate_in_a_tensor_name_is_exit_2(command, run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = model.state_dict()
    save_file(sd, tmp_path / "release.safetensors")
    sd["fc1.\ud800weight"] = sd.pop("fc1.weight")
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    args = {"inspect": ("inspect", tmp_path / "c.pt"), "convert": ("convert", tmp_path / "c.pt", out),
            "diff": ("diff", tmp_path / "c.pt"), "check": ("check", tmp_path / "release.safetensors", "--ckpt", tmp_path / "c.pt")}
    result = run(*args[command])
    assert_clean(result, out)
    assert "\\ud800" in result.stderr


@pytest.mark.parametrize("header", [{"\ud800a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                    {"__metadata__": {"format": "\udfff"}, "a": {"dtype": "F32", "shape": [2],
                                                                                 "data_offsets": [0, 8]}}],
                         ids=["name", "metadata"])
def test_lone_surrogate_escape_in_a_safetensors_header_is_exit_2(header, run, tmp_path):
    """Python's JSON parser keeps "\\ud800"; the safetensors library refuses the header, and so does sfckpt."""
    import struct

    text = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    for args in (("check", tmp_path / "w.safetensors", "--ckpt", tmp_path / "c.pt"),
                 ("diff", tmp_path / "w.safetensors", tmp_path / "c.pt")):
        result = run(*args)
        assert_clean(result, tmp_path / "x")
        assert "lone surrogate" in result.stderr


@pytest.mark.parametrize("change,fragment", [
    (lambda g: g.update(lr=1 << 150_000), "at most 14284"),
    (lambda g: g.update(betas=(1 << 3000, 0.999)), "β is an integer of 3001 bits"),
    (lambda g: g.update(lr=1 << 5000, weight_sum=1 << 4000), None),
], ids=["wider-than-text", "beta-wider-than-a-float", "lr-wider-than-a-float"])
def test_wide_integers_under_a_raised_limit(change, fragment, run, tmp_path, monkeypatch):
    """SFCKPT_MAX_INT_BITS=200000 lets wide integers load: none may crash where it becomes a float or text."""
    monkeypatch.setenv("SFCKPT_MAX_INT_BITS", "200000")
    path = _saved(tmp_path, lambda o: [change(g) for g in o["param_groups"]])
    for command in ("inspect", "convert", "diff"):
        args = (command, path, tmp_path / "x") if command == "convert" else (command, path)
        result = run(*args)
        assert_clean(result, tmp_path / "x", allow_success=fragment is None)
        assert fragment is None or fragment in result.stderr
    if fragment is None:
        assert json.loads(run("inspect", path, "--json").stdout)


@pytest.mark.parametrize("value", ["1e30", "1_000_000_000_000_000_000_000"])
def test_expansion_limit_raised_to_1e30_still_bounds_stride_zero_views(value, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = model.state_dict()
    sd["wide"] = Crafted(torch.zeros(1), 0, (1 << 20, 1 << 20, 1 << 10), (0, 0, 0))
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        args = (command, tmp_path / "c.pt", tmp_path / "x") if command == "convert" else (command, tmp_path / "c.pt")
        proc = _cli(*args, env={"SFCKPT_MAX_EXPANSION": value}, memory_gb=3)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        if command == "convert":
            _clean_exit(proc)


def test_limits_read_whole_numbers_written_as_powers_of_ten(monkeypatch):
    from sfckpt import limits

    monkeypatch.setenv("SFCKPT_MAX_LAYERS", "1e3")
    assert limits.CONFIG_LAYERS.value == 1000
    for bad in ("1.5", "1e-3", "nan", "inf", "-1", "x"):
        monkeypatch.setenv("SFCKPT_MAX_LAYERS", bad)
        with pytest.raises(sfckpt.InputError):
            limits.CONFIG_LAYERS.value


@pytest.mark.parametrize("count", [torch.tensor(float("nan")), torch.tensor(True)], ids=["nan", "bool"])
def test_weight_averaging_count_that_is_not_a_count(count, run, tmp_path):
    """Lightning WeightAveraging's n_averaged read where it decides whether the model held the average."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "current_model_state": dict(sd), "averaging_state": {"n_averaged": count},
                "optimizer_states": [opt.state_dict()], "global_step": 4, "epoch": 0,
                "pytorch-lightning_version": "2.5.0"}, tmp_path / "last.ckpt")
    result = run("convert", tmp_path / "last.ckpt", tmp_path / "x.safetensors")
    assert_clean(result, tmp_path / "x.safetensors")
    assert "saved after training ended" in result.stderr
