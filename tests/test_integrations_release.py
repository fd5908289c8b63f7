"""`sfckpt.release(model, optimizer, path)`: x of live objects, equal to the optimizer's own eval(),
with the model and the optimizer left exactly as they were."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

import sfckpt
import trainers
from conftest import assert_equal_tensors, read


def _snapshot(model, opt):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups],
            {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()})


def _same_snapshot(a, b):
    assert_equal_tensors(a[0], b[0])
    assert a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        for name, value in a[2][key].items():
            assert torch.equal(value, b[2][key][name]) if torch.is_tensor(value) else value == b[2][key][name]


@pytest.mark.parametrize("model_cls", [trainers.MLP, trainers.TiedLM, trainers.ConvBN], ids=lambda c: c.__name__)
def test_release_is_eval_x_and_changes_nothing(model_cls, tmp_path):
    torch.manual_seed(0)
    model = model_cls()
    opt = trainers.train(model, "adamw")
    before = _snapshot(model, opt)
    sfckpt.release(model, opt, tmp_path / "x.safetensors")
    _same_snapshot(before, _snapshot(model, opt))
    assert all(g["train_mode"] for g in opt.param_groups)
    expected = trainers.eval_x(model, opt)
    if model_cls is trainers.TiedLM:
        del expected["head.weight"]  # safetensors keeps one name per shared tensor (model.safetensors does the same)
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors({k: v for k, v in got.items() if k in expected}, expected)


def test_release_after_eval_copies_x(tmp_path):
    """eval() already ran (the parameters hold x): the flag says so, and nothing is converted twice."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    opt.eval()
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sfckpt.release(model, opt, tmp_path / "x.safetensors")
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)


def test_release_then_eval_gives_the_same_bits(tmp_path):
    """The brief's order: release first, then the optimizer's own eval() on the very same objects."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", steps=6)
    sfckpt.release(model, opt, tmp_path / "release/")
    opt.eval()
    assert_equal_tensors(read(tmp_path / "release" / "model.safetensors"),
                         {k: v.detach() for k, v in model.state_dict().items()})


def test_release_of_a_ddp_wrapped_model_has_the_plain_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    from conftest import free_port

    monkeypatch.setenv("MASTER_PORT", free_port())
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(trainers.MLP())
        opt = trainers.train(model, "adamw")
        twin, twin_opt = copy.deepcopy((model.module, opt))
        sfckpt.release(model, opt, tmp_path / "x.safetensors")
    finally:
        torch.distributed.destroy_process_group()
    twin_opt.eval()
    expected = {k: v.detach() for k, v in twin.state_dict().items()}
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)


def test_release_of_a_hugging_face_model_loads_with_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    import schedulefree

    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=torch.randint(0, 32, (2, 6)), labels=torch.randint(0, 32, (2, 6))).loss.backward()
        opt.step()
    sfckpt.release(model, opt, tmp_path / "release/", metadata={"sfckpt_training_step": "3"})
    twin, twin_opt = copy.deepcopy((model, opt))
    twin_opt.eval()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "release")
    assert_equal_tensors(loaded.state_dict(), {k: v.detach() for k, v in twin.state_dict().items()})
    with safe_open(str(tmp_path / "release" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["sfckpt_training_step"] == "3" and meta["sfckpt_source_params"] == "y"
    assert json.loads((tmp_path / "release" / "config.json").read_text())["model_type"] == "llama"


def test_release_with_bn_loader_recalibrates_a_copy(tmp_path):
    """BatchNorm statistics at x from a shuffling loader: the live model, its buffers and the global RNG stay as they were."""
    torch.manual_seed(0)
    model = trainers.ConvBN()
    opt = trainers.train(model, "adamw")
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 5, 5), torch.zeros(12))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    before = _snapshot(model, opt)
    rng = torch.get_rng_state()
    sfckpt.release(model, opt, tmp_path / "x.safetensors", bn_loader=loader)
    assert torch.equal(rng, torch.get_rng_state())
    _same_snapshot(before, _snapshot(model, opt))
    got = read(tmp_path / "x.safetensors")
    x = trainers.eval_x(model, opt)
    assert torch.equal(got["conv.weight"], x["conv.weight"])
    assert not torch.equal(got["bn.running_mean"], x["bn.running_mean"])


def test_release_refuses_an_optimizer_of_another_model(tmp_path):
    model = trainers.MLP()
    opt = trainers.train(trainers.MLP(), "adamw")
    with pytest.raises(sfckpt.InputError, match="not a parameter of the MLP"):
        sfckpt.release(model, opt, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
