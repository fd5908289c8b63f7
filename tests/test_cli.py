"""What a new user trips over (issue #12): messages, usage errors, --json on failure, output names, release folders."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import sfckpt
import trainers
from conftest import FIXTURES, assert_one_error_line, read, save_checkpoint
from sfckpt.cli import main
from test_reconstruct_batchnorm import MODEL_FILE

LFS_TEXT = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n"


# ---- usage errors and --json on failure ----------------------------------------------------


@pytest.mark.parametrize(
    "args,words",
    [
        (["diff", "--sort", "foo", "a.pt"], ["'--sort'", "'foo'", "sfckpt diff --help"]),
        (["check", "x.safetensors"], ["Missing option '--ckpt'", "sfckpt check --help"]),
        (["inspect"], ["Missing argument 'CKPT'"]),
        (["convert", "a.pt", "b.safetensors", "--bogus"], ["--bogus"]),
        (["nosuchcommand"], ["nosuchcommand"]),
    ],
)
def test_usage_errors_are_one_line(run, args, words):
    result = run(*args)
    assert_one_error_line(result, *words)
    assert result.stdout == ""


def test_usage_error_through_the_console_script():
    exe = Path(sys.executable).parent / "sfckpt"
    proc = subprocess.run([str(exe), "diff", "--sort", "foo", "x.pt"], capture_output=True, text=True)
    assert_one_error_line(proc)
    assert proc.stderr.count("\n") == 1
    assert "Usage:" not in proc.stderr


def test_json_error_document_on_stdout(run, tmp_path):
    result = run("inspect", tmp_path / "missing.pt", "--json")
    assert_one_error_line(result, "no such file")
    doc = json.loads(result.stdout)
    assert doc == {"version": 1, "error": {"message": doc["error"]["message"], "hint": doc["error"]["hint"], "exit_code": 2}}
    assert "missing.pt" in doc["error"]["message"] and doc["error"]["hint"]
    usage = run("check", "x.safetensors", "--json")
    assert_one_error_line(usage, "--ckpt")
    assert json.loads(usage.stdout)["error"]["exit_code"] == 2
    plain = run("inspect", tmp_path / "missing.pt")
    assert plain.stdout == ""  # without --json, stdout stays empty


def test_help_is_not_truncated_and_options_are_explained(run):
    top = run("--help").stdout
    commands = top.split("Commands:")[1]
    assert "..." not in commands
    for command in ("inspect", "convert", "diff", "check"):
        assert f"  {command}  " in commands
    check_help = run("check", "--help").stdout
    assert "[default: 0.0]" not in check_help and "default: 0, exact" in check_help
    diff_help = " ".join(run("diff", "--help").stdout.split())
    assert "--sort [rel_l2|max_abs|mean_abs|cosine|name] Order of the table's rows" in diff_help


# ---- output names ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,suggestion", [("model.safetensor", "model.safetensors"), ("out.pt", "out.safetensors")])
def test_mistyped_output_name_is_refused(run, tmp_path, name, suggestion):
    result = run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / name)
    assert_one_error_line(result, suggestion, f"{name}/")
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["release/", "release", "existing.v2"])
def test_folder_outputs(run, tmp_path, name):
    (tmp_path / "existing.v2").mkdir()
    result = run("convert", FIXTURES / "adamw_mlp.pt", f"{tmp_path}/{name}")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / name.rstrip("/") / "model.safetensors").is_file()


def test_trailing_slash_makes_a_suffixed_name_a_folder(run, tmp_path):
    assert run("convert", FIXTURES / "adamw_mlp.pt", f"{tmp_path}/run.v1/").exit_code == 0
    assert (tmp_path / "run.v1" / "model.safetensors").is_file()


def test_small_model_with_max_shard_size_is_one_file_without_index(run, tmp_path):
    """As docs/cli.md says (and Hugging Face does): shards only when x is larger than the limit."""
    assert run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "release", "--max-shard-size", "5GB").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == ["model.safetensors"]


# ---- quiet -----------------------------------------------------------------------------------


def test_quiet_bn_calib_prints_nothing(run, tmp_path):
    torch.manual_seed(0)
    model = trainers.ConvBN()
    ckpt = save_checkpoint(tmp_path / "c.pt", model, trainers.train(model, "sgd", steps=3))
    torch.save(torch.randn(16, 3, 5, 5), tmp_path / "calib.pt")
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--bn-calib", tmp_path / "calib.pt",
                 "--model", f"{tmp_path / 'model_def.py'}:build", "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""


# ---- check and BatchNorm statistics re-estimated by convert --bn-calib ----------------------


@pytest.fixture
def calibrated(run, tmp_path):
    torch.manual_seed(0)
    model = trainers.ConvBN()
    ckpt = save_checkpoint(tmp_path / "c.pt", model, trainers.train(model, "sgd", steps=6))
    torch.save(torch.randn(40, 3, 5, 5), tmp_path / "calib.pt")
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    release = tmp_path / "release"
    result = run("convert", ckpt, release, "--bn-calib", tmp_path / "calib.pt", "--model", f"{tmp_path / 'model_def.py'}:build")
    assert result.exit_code == 0, result.stderr
    return ckpt, release


def test_check_passes_a_bn_calib_release_and_says_so(calibrated, run):
    ckpt, release = calibrated
    result = run("check", release, "--ckpt", ckpt, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, report["verdict"]
    assert report["batchnorm_reestimated"] == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    assert "re-estimated at x" in report["verdict"] and "every other tensor compared" in report["verdict"]
    table = run("check", release, "--ckpt", ckpt)
    assert table.exit_code == 0 and "BatchNorm" in table.stdout.splitlines()[0]


def test_check_still_judges_the_other_tensors_of_a_bn_calib_release(calibrated, run, tmp_path):
    ckpt, release = calibrated
    path = release / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = read(path)
    tensors["conv.weight"] = tensors["conv.weight"] + 1
    save_file(tensors, str(path), metadata=metadata)
    result = run("check", release, "--ckpt", ckpt)
    assert result.exit_code == 1
    assert "1 tensor differs from x (worst: conv.weight" in result.stdout and "not compared" in result.stdout


def test_bn_statistics_without_the_metadata_still_fail(calibrated, run, tmp_path):
    ckpt, release = calibrated
    save_file(read(release / "model.safetensors"), str(tmp_path / "stripped.safetensors"))
    result = run("check", tmp_path / "stripped.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1 and "bn.running_mean" in result.stdout


# ---- Git LFS pointers inside release folders and indexes -----------------------------------


def test_lfs_pointers_in_a_folder_or_index_get_the_lfs_message(run, tmp_path):
    ckpt = FIXTURES / "adamw_mlp.pt"
    single = tmp_path / "single"
    single.mkdir()
    (single / "model.safetensors").write_text(LFS_TEXT)
    assert run("convert", ckpt, tmp_path / "sharded", "--max-shard-size", "300B").exit_code == 0
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.write_text(LFS_TEXT)
    for target in (single, tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json"):
        for args in (["check", target, "--ckpt", ckpt], ["diff", target, ckpt]):
            result = run(*args)
            assert_one_error_line(result, "Git LFS pointer", "lfs: true")
    assert shard.name in run("check", tmp_path / "sharded", "--ckpt", ckpt).stderr


# ---- messages -------------------------------------------------------------------------------


def test_diff_with_no_tensor_in_common_is_an_error(run, tmp_path):
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    assert_one_error_line(run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors"), "nothing to compare")


def test_inspect_and_diff_agree_on_what_changes(run):
    """inspect counts converted tensors; diff says which of them came out unchanged, and why."""
    ckpt = FIXTURES / "sgd_convbn.pt"
    inspected = json.loads(run("inspect", ckpt, "--json").stdout)["mapping"]
    diffed = json.loads(run("diff", ckpt, "--json").stdout)["summary"]
    assert diffed["converted"] == inspected["tensors_converted"]
    assert diffed["differ"] + len(diffed["converted_but_identical"]) == inspected["tensors_converted"]
    table = run("diff", ckpt).stdout
    if diffed["converted_but_identical"]:
        assert "converted tensor" in table and "z equals y" in table
    assert "tensors converted" in run("inspect", ckpt).stdout


def test_plurals(run, tmp_path):
    text = run("inspect", FIXTURES / "sgd_convbn.pt").stdout
    assert "1 layers" not in text and "BatchNorm: 1 layer " in text
    model = torch.nn.Linear(8, 4, bias=False)
    ckpt = save_checkpoint(tmp_path / "one.pt", model, trainers.train(model, "adamw", steps=2))
    result = run("convert", ckpt, tmp_path / "one.safetensors")
    assert result.exit_code == 0 and "(adamw; 1 tensor converted from y to x" in result.stderr
    diffed = run("diff", ckpt).stdout
    assert "1 tensor compared" in diffed and "1 tensors" not in diffed


def test_optimizer_only_file_error_starts_with_the_path(run, tmp_path):
    torch.save({"optimizer": torch.load(FIXTURES / "adamw_mlp.pt")["optimizer"]}, tmp_path / "opt.pt")
    result = run("inspect", tmp_path / "opt.pt")
    assert_one_error_line(result)
    assert result.stderr.startswith(f"error: {tmp_path / 'opt.pt'}: ")


def test_wrong_optimizer_family_says_the_family_does_not_match(run, tmp_path):
    result = run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", "--optimizer", "sgd")
    assert_one_error_line(result, "sgd")
    assert "--beta" not in result.stderr and "does not match" in result.stderr


def test_inspect_wrapper_without_beta_shows_everything(run):
    result = run("inspect", FIXTURES / "wrapper_sgd_beta0.75.pt", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["groups"][0]["beta"] is None and report["tensors"]["count"] > 0
    table = run("inspect", FIXTURES / "wrapper_sgd_beta0.75.pt")
    assert table.exit_code == 0 and "--beta" in table.stdout + table.stderr


# ---- install and API -------------------------------------------------------------------------


@pytest.mark.slow
def test_no_numpy_warning_on_stderr(tmp_path):
    exe = Path(sys.executable).parent / "sfckpt"
    proc = subprocess.run([str(exe), "convert", str(FIXTURES / "adamw_mlp.pt"), str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "NumPy" not in proc.stderr and proc.stderr.count("\n") == 1


def test_numpy_is_a_dependency():
    import tomllib

    deps = tomllib.loads((FIXTURES.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("numpy") for d in deps)


def test_api_errors_name_keyword_arguments(tmp_path):
    out = tmp_path / "model.safetensors"
    sfckpt.convert(str(FIXTURES / "adamw_mlp.pt"), str(out))
    with pytest.raises(sfckpt.OutputError) as info:
        sfckpt.convert(FIXTURES / "adamw_mlp.pt", out)
    assert "force=True" in str(info.value) and "--force" not in str(info.value)
    assert info.value.hint == "pass force=True to replace it"
    with pytest.raises(sfckpt.InputError) as info:
        sfckpt.reconstruct(sfckpt.load(str(FIXTURES / "wrapper_sgd_beta0.75.pt")))
    assert "--beta" not in str(info.value) and "beta=" in str(info.value)
    cli = CliRunner().invoke(main, ["convert", str(FIXTURES / "adamw_mlp.pt"), str(out)])
    assert "--force" in cli.stderr  # the CLI keeps its own words


def test_public_functions_accept_str_and_pathlike(tmp_path):
    from sfckpt.compare import check_release, diff_sets
    from sfckpt.sources import open_weights, released_weights

    out = tmp_path / "model.safetensors"
    sfckpt.save(sfckpt.reconstruct(sfckpt.load(str(FIXTURES / "adamw_mlp.pt"))), str(out))
    for path in (str(out), out):
        assert set(open_weights(path).tensors) == set(released_weights(path).tensors)
    report = diff_sets(open_weights(str(out)), open_weights(str(FIXTURES / "adamw_mlp.pt")))
    assert report["summary"]["differ"] == 0
    assert check_release(open_weights(str(out)), sfckpt.reconstruct(sfckpt.load(str(FIXTURES / "adamw_mlp.pt"))))["passed"]


def test_debug_env_shows_traceback(run, tmp_path, monkeypatch):
    (tmp_path / "empty.pt").write_bytes(b"")
    monkeypatch.setenv("SFCKPT_DEBUG", "1")
    result = run("inspect", tmp_path / "empty.pt")
    assert result.exit_code == 2 and "Traceback" in result.stderr
