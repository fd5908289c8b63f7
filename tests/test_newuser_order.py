"""What a new user meets with an Accelerate folder whose model.safetensors keeps no parameter order:
the refusal names the look-alike tensors and the real reason, --param-order-from takes the order from
the user's model, and inspect describes the folder instead of refusing it (issue #24).

Checkpoints come from the real Accelerator and AdamWScheduleFree; x from the optimizer's own eval()."""
import json
import textwrap

import pytest
import schedulefree
import torch
from torch import nn

from conftest import assert_equal_tensors, read

accelerate = pytest.importorskip("accelerate")


class Normed(nn.Module):
    """Linear layers with LayerNorms: the gains and biases of the norms look alike to content."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm1 = nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16)
        self.norm2 = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norm2(self.mid(self.norm1(self.inp(x)).relu())).relu())


MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn


    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 16)
            self.norm1 = nn.LayerNorm(16)
            self.mid = nn.Linear(16, 16)
            self.norm2 = nn.LayerNorm(16)
            self.out = nn.Linear(16, 4)


    def build():
        return Normed()


    def build_other():
        return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
''')


def _save_state(folder, model, batch):
    """Train `model` four steps through Accelerate and save_state(folder); x from the optimizer's eval()."""
    torch.manual_seed(0)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.02, betas=(0.85, 0.999), weight_decay=0.01)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    model.train()
    opt.train()
    for _ in range(4):
        opt.zero_grad()
        acc.backward(batch(model))
        opt.step()
    acc.save_state(str(folder))
    opt.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def normed(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    x = _save_state(folder, Normed(), lambda m: m(torch.randn(16, 8)).pow(2).mean())
    (tmp_path / "models.py").write_text(MODEL_FILE)
    return folder, x


def test_refusal_names_the_look_alikes_and_the_missing_order(normed, run, tmp_path):
    folder, _ = normed
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot place ")
    assert "the weights file lists its tensors sorted by name, so it keeps no parameter order" in result.stderr
    assert "'norm1.weight'" in result.stderr and "look alike" in result.stderr
    assert "--param-order-from MODULE:CALLABLE" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_param_order_from_a_callable_in_a_file_gives_eval_x(normed, run, tmp_path):
    folder, x = normed
    out = tmp_path / "x.safetensors"
    result = run("convert", folder, out, "--param-order-from", f"{tmp_path / 'models.py'}:build")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), x)


def test_param_order_from_another_model_is_refused_by_name(normed, run, tmp_path):
    folder, _ = normed
    result = run("convert", folder, tmp_path / "x.safetensors", "--param-order-from", f"{tmp_path / 'models.py'}:build_other")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: --param-order-from '{tmp_path / 'models.py'}:build_other' lists 4 names "
                                    "but the optimizer has 10 entries")
    assert "named_parameters() order" in result.stderr and not (tmp_path / "x.safetensors").exists()


def test_param_order_and_param_order_from_together_are_refused(normed, run, tmp_path):
    folder, _ = normed
    (tmp_path / "order.txt").write_text("inp.weight\n")
    result = run("convert", folder, tmp_path / "x.safetensors", "--param-order", tmp_path / "order.txt",
                 "--param-order-from", f"{tmp_path / 'models.py'}:build")
    assert result.exit_code == 2 and "--param-order and --param-order-from both give the order" in result.stderr


def test_inspect_describes_a_folder_whose_order_is_missing(normed, run):
    folder, _ = normed
    result = run("inspect", folder)
    assert result.exit_code == 0, result.stderr
    assert "container         accelerate" in result.stdout and "adamw (AdamWScheduleFree" in result.stdout
    assert "undecided" in result.stdout and "0 of 10 tensors converted" in result.stdout
    assert "warning: x cannot be made yet: cannot place " in result.stderr
    report = json.loads(run("inspect", folder, "--json").stdout)
    assert report["groups"][0]["step"] == 4 and report["groups"][0]["beta"] == 0.85
    assert report["mapping"]["tensors_converted"] == 0


def test_param_order_from_a_transformers_class_and_config(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(0, 64, (4, 16))
    x = _save_state(tmp_path / "ckpt", model, lambda m: m(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss)
    cfg.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "x.safetensors"
    refused = run("convert", tmp_path / "ckpt", out)
    assert refused.exit_code == 2 and "keeps no parameter order" in refused.stderr
    result = run("convert", tmp_path / "ckpt", out, "--param-order-from", "transformers:BertForSequenceClassification",
                 "--config", tmp_path / "cfg" / "config.json")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), x)
    # without --config, the checkpoint folder's own config.json
    (tmp_path / "ckpt" / "config.json").write_bytes((tmp_path / "cfg" / "config.json").read_bytes())
    again = run("convert", tmp_path / "ckpt", tmp_path / "again.safetensors", "--param-order-from",
                "transformers:BertForSequenceClassification")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == out.read_bytes()


def test_transformers_class_refuses_a_config_with_custom_code(normed, run, tmp_path):
    folder, _ = normed
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}))
    result = run("convert", folder, tmp_path / "x.safetensors", "--param-order-from",
                 "transformers:BertForSequenceClassification", "--config", tmp_path / "config.json")
    assert result.exit_code == 2 and "custom code (auto_map), which sfckpt never runs" in result.stderr


def test_a_plan_left_undecided_is_never_written(normed, tmp_path):
    """reconstruct(undecided_ok=True) exists to describe; saving it (or reading its x) raises why."""
    import sfckpt
    from sfckpt.errors import InputError
    from sfckpt.reconstruct import reconstruct

    folder, _ = normed
    recon = reconstruct(sfckpt.load(folder), undecided_ok=True)
    assert recon.n_converted == 0 and recon.undecided is not None
    with pytest.raises(InputError, match="cannot place"):
        sfckpt.save(recon, tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="cannot place"):
        recon.state_dict()
    assert not (tmp_path / "x.safetensors").exists()
