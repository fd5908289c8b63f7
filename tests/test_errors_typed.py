"""Typed errors: what, where and which option as attributes; the CLI and the API each in their own words;
the original exception kept as the cause."""

import pytest
import torch
from click.testing import CliRunner

import sfckpt
import trainers
from conftest import FIXTURES
from sfckpt.cli import main
from sfckpt.errors import (DamagedInput, LimitExceeded, MappingUndecided, NotScheduleFree, Opt, OptionConflict,
                           OutputExists)


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0], result.stderr
    return lines[0]


def tied_lm_saved_apart(path):
    """A tied embedding/head saved as two copies: which of --twins applies, the file cannot tell."""
    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    torch.save({"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}, path)
    return path


def test_twins_refusal_names_the_option_as_an_attribute(tmp_path):
    with pytest.raises(MappingUndecided) as info:
        sfckpt.reconstruct(sfckpt.load(tied_lm_saved_apart(tmp_path / "tied.pt")))
    assert info.value.option == "twins"


def test_twins_refusal_in_api_words(tmp_path):
    with pytest.raises(MappingUndecided) as info:
        sfckpt.reconstruct(sfckpt.load(tied_lm_saved_apart(tmp_path / "tied.pt")))
    assert 'twins="tied"' in info.value.hint and 'twins="frozen"' in info.value.hint
    assert "--twins" not in str(info.value)


def test_twins_refusal_in_cli_words(run, tmp_path):
    line = one_error_line(run("convert", tied_lm_saved_apart(tmp_path / "tied.pt"), tmp_path / "x.safetensors"))
    assert "--twins tied" in line and "--twins frozen" in line and "twins=" not in line


def test_existing_output_says_where_and_which_option(tmp_path):
    out = tmp_path / "x.safetensors"
    sfckpt.convert(FIXTURES / "adamw_mlp.pt", out)
    with pytest.raises(OutputExists) as info:
        sfckpt.convert(FIXTURES / "adamw_mlp.pt", out)
    assert (info.value.where, info.value.option, info.value.hint) == (str(out), "force", "pass force=True to replace it")


def test_param_order_of_the_wrong_length_is_an_option_conflict(run, tmp_path):
    order = tmp_path / "order.txt"
    order.write_text("fc1.weight\nfc1.bias\n")
    with pytest.raises(OptionConflict) as info:
        sfckpt.convert(FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", param_order=["fc1.weight", "fc1.bias"])
    assert info.value.option == "param_order" and info.value.message.startswith("param_order lists 2 names")
    line = one_error_line(run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", "--param-order", order))
    assert line.startswith("error: --param-order lists 2 names")


def test_plain_adamw_is_not_schedule_free(tmp_path):
    model = trainers.MLP()
    opt = torch.optim.AdamW(model.parameters())
    model(trainers.example_input(model)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "adamw.pt")
    with pytest.raises(NotScheduleFree):
        sfckpt.reconstruct(sfckpt.load(tmp_path / "adamw.pt"))


def test_limit_exceeded_names_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("SFCKPT_MAX_PICKLE_BYTES", "100")
    with pytest.raises(LimitExceeded) as info:
        sfckpt.load(FIXTURES / "adamw_mlp.pt")
    assert info.value.env == "SFCKPT_MAX_PICKLE_BYTES" and "SFCKPT_MAX_PICKLE_BYTES=N" in info.value.hint


def test_damaged_zip_keeps_the_original_exception_as_its_cause(tmp_path):
    data = (FIXTURES / "adamw_mlp.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(DamagedInput) as info:
        sfckpt.load(tmp_path / "cut.pt")
    assert info.value.__cause__ is not None and not isinstance(info.value.__cause__, sfckpt.SfckptError)


def test_debug_prints_the_cause_chain(tmp_path, monkeypatch):
    data = (FIXTURES / "adamw_mlp.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    monkeypatch.setenv("SFCKPT_DEBUG", "1")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "cut.pt")])
    assert result.exit_code == 2
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert "BadZipFile" in result.stderr and result.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_a_bug_while_reading_tensor_data_is_an_internal_error(run, tmp_path, monkeypatch):
    from sfckpt.readers.torch_file import TorchArchive

    def broken(self, *args):
        raise TypeError("a bug in the reader")

    monkeypatch.setattr(TorchArchive, "_read_elements", broken)
    result = run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "internal error: TypeError: a bug in the reader" in result.stderr
    assert "damaged" not in result.stderr


def test_an_option_is_never_formatted_into_text():
    with pytest.raises(TypeError):
        f"pass {Opt('force')}"


def test_calibration_data_without_a_model_is_an_option_conflict(run, tmp_path):
    with pytest.raises(OptionConflict) as info:
        sfckpt.convert(FIXTURES / "sgd_convbn.pt", tmp_path / "x.safetensors", bn_calib="data.pt")
    assert info.value.option == "bn_model" and info.value.message == "bn_calib and bn_model go together"
    line = one_error_line(run("convert", FIXTURES / "sgd_convbn.pt", tmp_path / "x.safetensors", "--bn-calib", "data.pt"))
    assert line.startswith("error: --bn-calib and --model go together")


def test_every_option_an_error_names_has_a_flag_and_a_keyword():
    import re
    from dataclasses import fields
    from pathlib import Path

    from sfckpt.cli_words import FLAGS

    keywords = {f.name for f in fields(sfckpt.Options)}
    assert set(FLAGS) == keywords - {"require_beta", "undecided_ok"}  # inspect's own choices, not flags
    source = "".join(p.read_text() for p in (Path(sfckpt.__file__).parent).rglob("*.py"))
    named = set(re.findall(r"""\bOpt\(\s*["']([a-z_]+)["']""", source))
    assert named and named <= set(FLAGS), named - set(FLAGS)
