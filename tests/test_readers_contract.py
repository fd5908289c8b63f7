"""The container contract, run against every registered reader (sfckpt/readers/base.py).

Each reader recognises its own containers, and no other container that an earlier reader does
not own first; a damaged save is refused in one line, never an internal error; what it hands
over (container name, traits) is what `load` reports. A new reader adds one builder here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import schedulefree
from sfckpt import load
from sfckpt.readers import registry
from sfckpt.readers.base import Opened, Reader

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=0)
    opt.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def build_torch(tmp: Path) -> Path:
    model, opt = _trained()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp / "ckpt.pt")
    return tmp / "ckpt.pt"


def build_dcp(tmp: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    model, opt = _trained()
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tmp / "dcp", no_dist=True)
    return tmp / "dcp"


def build_lightning_fsdp(tmp: Path) -> Path:
    """The shape FSDPStrategy(state_dict_type="sharded") writes: DCP data beside a torch.save'd meta.pt."""
    import torch.distributed.checkpoint as dcp

    model, opt = _trained()
    folder = tmp / "last.ckpt"
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    dcp.save({"model": sd, "optimizer_0": opt.state_dict()}, checkpoint_id=folder, no_dist=True)
    torch.save({"epoch": 0, "global_step": 3}, folder / "meta.pt")
    return folder


def build_deepspeed(tmp: Path) -> Path:
    shutil.copytree(FIXTURES / "deepspeed" / "zero2-fp32", tmp / "ds")
    return tmp / "ds"


def build_accelerate(tmp: Path) -> Path:
    from accelerate import Accelerator

    model, opt = _trained()
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    acc.save_state(str(tmp / "acc"))
    return tmp / "acc"


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                     max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg)


def build_trainer(tmp: Path) -> Path:
    """What Trainer._save_checkpoint writes: save_pretrained's files, optimizer.pt, trainer_state.json."""
    model = _tiny_bert()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, warmup_steps=0)
    folder = tmp / "checkpoint-3"
    model.save_pretrained(folder)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    return folder


def build_peft(tmp: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"]))
    opt = schedulefree.AdamWScheduleFree([p for p in model.parameters() if p.requires_grad], lr=0.01)
    folder = tmp / "checkpoint-3"
    model.save_pretrained(folder)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    return folder


def build_deepspeed_universal(tmp: Path) -> Path:
    shutil.copytree(FIXTURES / "deepspeed-universal" / "zero2-fp32-z", tmp / "universal")
    return tmp / "universal"


def build_orbax(tmp: Path) -> Path:
    shutil.copytree(FIXTURES / "orbax" / "fp32" / "ckpt", tmp / "ckpt")
    return tmp / "ckpt"


def build_keras(tmp: Path) -> Path:
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported: no TensorFlow or JAX
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01), loss="mse")
    model.fit(np.ones((6, 4), np.float32), np.ones((6, 2), np.float32), batch_size=2, verbose=0)
    model.save(tmp / "model.keras")
    return tmp / "model.keras"


# builder, the reader that must own it, the container name `load` reports
CASES = {
    "torch.save": (build_torch, "torch.save", "torch.save"),
    "torch.distributed.checkpoint": (build_dcp, "torch.distributed.checkpoint", "torch.distributed.checkpoint"),
    "lightning-fsdp": (build_lightning_fsdp, "lightning-fsdp", "lightning-fsdp"),
    "deepspeed": (build_deepspeed, "deepspeed", "deepspeed"),
    "accelerate": (build_accelerate, "accelerate", "accelerate"),
    "huggingface-trainer": (build_trainer, "huggingface-trainer", "huggingface-trainer"),
    "peft-adapter": (build_peft, "peft-adapter", "peft-adapter"),
    "deepspeed-universal": (build_deepspeed_universal, "deepspeed-universal", "deepspeed-universal"),
    "orbax": (build_orbax, "orbax", "orbax"),
    "keras": (build_keras, "keras", "keras"),
}
# Shapes that contain another: the later reader would also claim them, so order decides (registry.py).
CONTAINS = {("huggingface-trainer", "peft-adapter"), ("torch.distributed.checkpoint", "lightning-fsdp")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return {name: build(tmp_path_factory.mktemp(name.replace(".", "-"))) for name, (build, _, _) in CASES.items()}


def test_every_registered_reader_has_a_case():
    assert {r.name for r in registry.READERS} == {reader for _, reader, _ in CASES.values()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_registry_gives_each_container_its_own_reader(case, built):
    assert registry.find(built[case]).name == CASES[case][1]


@pytest.mark.parametrize("reader", registry.READERS, ids=lambda r: r.name)
def test_a_reader_claims_no_other_container(reader, built):
    for case, path in built.items():
        owner = CASES[case][1]
        if owner == reader.name or (reader.name, owner) in CONTAINS:
            continue
        from sfckpt.readers import sniff

        assert not reader.recognise(path, sniff(path)), f"{reader.name} claims {case}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_open_hands_over_the_contract(case, built):
    ckpt = load(built[case])
    assert ckpt.container == CASES[case][2]
    assert ckpt.weights and ckpt.optimizers
    reader = registry.find(built[case])
    assert isinstance(reader, Reader)
    from sfckpt.readers.base import LoadRequest

    opened = reader.open(built[case], LoadRequest())
    assert isinstance(opened, Opened) and isinstance(opened.ties_visible, bool)


def _optimizer_file(path: Path) -> Path:
    """The file holding the optimizer state (z): every container must read it."""
    if path.is_file():
        return path
    files = [f for f in path.rglob("*") if f.is_file() and ("optim" in f.name or f.suffix == ".distcp")]
    # Orbax keeps its arrays in the OCDBT data files the root manifest reads (d/<hash>), z's among them
    files = files or [f for f in path.glob("d/*") if f.is_file()]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_save_is_refused_in_one_line(case, built, tmp_path, run):
    copy = tmp_path / built[case].name
    (shutil.copytree if built[case].is_dir() else shutil.copy)(built[case], copy)
    victim = _optimizer_file(copy)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = run("convert", str(copy), str(tmp_path / "out.safetensors"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in lines[0], result.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_enters_each_reader_at_most_once(case, built, monkeypatch):
    calls: list[tuple[str, str]] = []

    class Counting(Reader):
        def __init__(self, inner: Reader):
            self.inner, self.name = inner, inner.name

        def recognise(self, path, kind):
            calls.append((self.name, "recognise"))
            return self.inner.recognise(path, kind)

        def open(self, path, request):
            calls.append((self.name, "open"))
            return self.inner.open(path, request)

    monkeypatch.setattr(registry, "READERS", tuple(Counting(r) for r in registry.READERS))
    load(built[case])
    assert len(calls) == len(set(calls))
    assert [name for name, what in calls if what == "open"] == [CASES[case][1]]
