"""What a conversion warns about reaches Python users as `sfckpt.SfckptWarning`s, worded with the
API's keyword arguments; the CLI prints the same warnings once, with its flags."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import sfckpt

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_convert_warns_of_batchnorm_statistics_in_api_words(tmp_path):
    with pytest.warns(sfckpt.SfckptWarning) as caught:
        sfckpt.convert(FIXTURES / "sgd_convbn.pt", tmp_path / "x.safetensors")
    texts = [str(w.message) for w in caught if w.category is sfckpt.SfckptWarning]
    bn = [t for t in texts if "BatchNorm statistics" in t]
    assert len(bn) == 1 and 'bn_calib="DATA"' in bn[0] and "--bn-calib" not in bn[0]


def test_assumed_mode_is_a_warning_naming_params_are(tmp_path):
    with pytest.warns(sfckpt.SfckptWarning, match='params_are="x"'):
        sfckpt.convert(FIXTURES / "wrapper_sgd_beta0.75.pt", tmp_path / "x.safetensors", beta=0.75)


def test_warnings_can_be_filtered_by_category(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", sfckpt.SfckptWarning)
        sfckpt.convert(FIXTURES / "sgd_convbn.pt", tmp_path / "x.safetensors")
    assert (tmp_path / "x.safetensors").is_file()


def test_recon_all_warnings_spells_options_for_whoever_prints():
    from sfckpt.cli_words import cli_words

    recon = sfckpt.reconstruct(sfckpt.load(FIXTURES / "sgd_convbn.pt"))
    assert any("bn_calib=" in w for w in recon.all_warnings())
    assert any("--bn-calib DATA" in w for w in recon.all_warnings(cli_words))


def test_cli_prints_each_warning_once_in_its_own_words(run, tmp_path):
    result = run("convert", FIXTURES / "sgd_convbn.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("BatchNorm statistics") == 1
    assert "--bn-calib DATA" in result.stderr and "SfckptWarning" not in result.stderr


def test_dtype_alias_in_the_api(tmp_path):
    from safetensors import safe_open

    sfckpt.convert(FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", dtype="bf16")
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
