"""The Trainer folder's parameter order is rebuilt from config.json (importing transformers) only where
the mapping needs it: where names and content place every optimizer entry, the order changes nothing."""
import pytest
import torch

from conftest import assert_equal_tensors, read, run_script
from test_cli_inspect_imports import cli_imports

pytestmark = pytest.mark.slow  # every test here reads a Hugging Face Trainer run made in a child process


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf-one-step")
    run_script("hf_trainer_one_step.py", out)
    return out / "checkpoint-1", torch.load(out / "expected_x.pt")


def test_content_places_every_entry_so_transformers_is_not_imported(one_step, tmp_path):
    ckpt, expected = one_step
    report, imported = cli_imports("convert", ckpt, tmp_path / "release", "--json")
    assert report["mapping"]["evidence"] == {"content": report["mapping"]["entries_with_z"]}
    assert imported == ["torch"]
    got = read(tmp_path / "release" / "model.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})
    assert set(expected) - set(got) == {"lm_head.weight"}  # tied to the embedding, saved once


def test_the_same_bytes_as_with_the_order_given(one_step, run, tmp_path):
    """--param-order (the order the rebuild would give) decides the same x."""
    from sfckpt.readers.hf_trainer import parameter_order

    ckpt, _ = one_step
    names, (decay, no_decay) = parameter_order(ckpt)
    order = tmp_path / "order.txt"
    order.write_text("\n".join([n for n in names if n in decay] + [n for n in names if n in no_decay]) + "\n")
    assert run("convert", ckpt, tmp_path / "a.safetensors").exit_code == 0
    assert run("convert", ckpt, tmp_path / "b.safetensors", "--param-order", order).exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
