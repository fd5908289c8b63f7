"""Holes an attack on the registry/options refactor (#21) and the new-user items (#24) found, kept closed."""
import warnings

import pytest
import torch
from safetensors.torch import save_file

import sfckpt
import trainers
from conftest import assert_equal_tensors, read
from sfckpt.errors import OptionConflict


def dcp_tied_lm(path):
    """A DCP folder of a tied LM: DCP saves the tie as a copy, which sfckpt converts with a warning."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)
    return model, opt


def test_api_tied_copy_warning_names_the_keyword_argument(tmp_path):
    model, opt = dcp_tied_lm(tmp_path / "dcp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sfckpt.SfckptWarning)
        sfckpt.convert(tmp_path / "dcp", tmp_path / "x.safetensors")
    said = [str(w.message) for w in caught if issubclass(w.category, sfckpt.SfckptWarning)]
    tie = [m for m in said if "'head.weight' is byte-identical to 'embed.weight'" in m]
    assert tie and 'twins="frozen"' in tie[0] and "--twins" not in tie[0], said
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


def test_sniffing_a_torch_zip_leaves_no_file_open(tmp_path):
    import gc

    from sfckpt.readers import sniff

    path = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, path)
    gc.collect()  # files earlier tests left to the collector (TorchArchive's, see the #21 note) close outside the check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert sniff(path) == "torch"
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_action_args_asking_for_help_are_an_error_not_a_pass(tmp_path):
    from test_cli_ci import _run_action_check
    from test_newuser_ci import _outputs, _repo

    repo, _, y = _repo(tmp_path)
    (repo / "release").mkdir()
    save_file(y, str(repo / "release" / "model.safetensors"))  # y: `check` would say not-x
    result, summary, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt", "--top 3 -h")
    assert result.returncode == 2 and _outputs(output) == {"passed": "false", "result": "error"}
    assert "error: the action's inputs ask for --help" in result.stderr and "Usage:" not in result.stdout
    assert "could not decide" in summary


class Deep(torch.nn.Module):
    """Six same-shape layers between an input and an output layer."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.mid = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.mid:
            x = torch.tanh(layer(x))
        return self.out(x)


def replaced_layer_checkpoint(path):
    """A layer re-initialised after training, saved with its optimizer: its z belongs to another tensor."""
    torch.manual_seed(0)
    model = Deep()
    opt = trainers.train(model, "adamw", steps=30)
    with torch.no_grad():
        model.mid[3].weight.copy_(torch.randn(16, 16))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return [name for name, _ in model.named_parameters()]


def test_api_misfit_of_a_given_order_names_the_keyword_argument(tmp_path):
    names = replaced_layer_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(sfckpt.SfckptError) as info:
        sfckpt.convert(tmp_path / "ckpt.pt", tmp_path / "x.safetensors", param_order=names)
    assert "'mid.3.weight' by param_order, but its z is unrelated" in str(info.value)
    assert "--param-order" not in str(info.value) + info.value.hint
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_misfit_of_a_given_order_names_the_flag(run, tmp_path):
    names = replaced_layer_checkpoint(tmp_path / "ckpt.pt")
    (tmp_path / "order.txt").write_text("\n".join(names) + "\n")
    result = run("convert", tmp_path / "ckpt.pt", tmp_path / "x.safetensors", "--param-order", tmp_path / "order.txt")
    assert result.exit_code == 2 and "'mid.3.weight' by --param-order, but its z is unrelated" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_api_param_order_given_as_a_file_name_is_refused_by_name(tmp_path):
    (tmp_path / "order.txt").write_text("fc1.weight\nfc1.bias\nfc2.weight\nfc2.bias\n")
    with pytest.raises(OptionConflict) as info:
        sfckpt.Options(param_order=str(tmp_path / "order.txt"))
    assert info.value.option == "param_order" and "is a list of names, not the str" in str(info.value)
    assert "read_text().split()" in info.value.hint


def test_api_limit_of_calibration_data_names_no_flag(tmp_path, monkeypatch):
    from pathlib import Path

    from sfckpt.errors import LimitExceeded
    from test_reconstruct_batchnorm import MODEL_FILE

    model = trainers.ConvBN()
    ckpt = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "optimizer": trainers.train(model, "sgd").state_dict()}, ckpt)
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    torch.save(torch.randn(40, 3, 5, 5), tmp_path / "calib.pt")
    monkeypatch.setenv("SFCKPT_MAX_CALIBRATION_BYTES", "1000")
    with pytest.raises(LimitExceeded) as info:
        sfckpt.convert(ckpt, tmp_path / "x.safetensors", bn_calib=str(tmp_path / "calib.pt"),
                       bn_model=f"{tmp_path / 'model_def.py'}:build")
    assert info.value.env == "SFCKPT_MAX_CALIBRATION_BYTES" and "--" not in str(info.value) + info.value.hint
