"""`sfckpt.Options`: one object from the CLI to the library, built from the API's keywords too."""
import os

import pytest
from safetensors.torch import load_file

import sfckpt
from conftest import FIXTURES, assert_equal_tensors, read
from test_reconstruct_batchnorm import bn_setup  # noqa: F401  (a fixture)


def test_options_object_converts_as_the_keywords_do(tmp_path):
    by_keywords = sfckpt.convert(FIXTURES / "wrapper_sgd_beta0.75.pt", tmp_path / "a.safetensors", beta=0.75)
    by_object = sfckpt.convert(FIXTURES / "wrapper_sgd_beta0.75.pt", tmp_path / "b.safetensors",
                               options=sfckpt.Options(beta=0.75))
    assert_equal_tensors(read(by_object[0]), read(by_keywords[0]))


def test_options_and_keywords_together_are_refused(tmp_path):
    with pytest.raises(TypeError, match="either options= or keyword arguments"):
        sfckpt.convert(FIXTURES / "adamw_mlp.pt", tmp_path / "x.safetensors", options=sfckpt.Options(), force=True)
    assert not os.listdir(tmp_path)


def test_convert_re_estimates_batchnorm_as_the_cli_does(bn_setup, run):  # noqa: F811
    ckpt, _, _, tmp = bn_setup
    model = f"{tmp / 'model_def.py'}:build"
    assert run("convert", ckpt, tmp / "cli.safetensors", "--bn-calib", tmp / "calib.pt", "--model", model,
               "--bn-batch-size", 8).exit_code == 0
    sfckpt.convert(ckpt, tmp / "api.safetensors", bn_calib=str(tmp / "calib.pt"), bn_model=model, bn_batch_size=8)
    assert_equal_tensors(load_file(tmp / "api.safetensors"), load_file(tmp / "cli.safetensors"))
