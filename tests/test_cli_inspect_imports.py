"""`sfckpt inspect` of every container never imports torch (nor transformers or peft).

Each test inspects one container in a fresh process and asserts which libraries stayed out of
`sys.modules`. torch.save files, DCP and DeepSpeed folders are kept by tests/test_speed.py; the
Trainer and PEFT folders show what content places and leave the look-alikes to the model's order,
which only `convert` rebuilds from config.json.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainers
from conftest import FIXTURES, SCRIPTS

PROBE = """
import json, sys
from click.testing import CliRunner
from sfckpt.cli import main
r = CliRunner().invoke(main, sys.argv[1:])
assert r.exit_code == 0, r.output
print(json.dumps({"report": json.loads(r.stdout) if "--json" in sys.argv else None,
                  "imported": sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)}))
"""


def cli_imports(*args) -> tuple[dict | None, list[str]]:
    """Run the CLI in a fresh process: its JSON report (with --json) and which of torch, transformers
    and peft it imported."""
    result = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    return out["report"], out["imported"]


def assert_inspected_without_torch(path: Path) -> dict:
    report, imported = cli_imports("inspect", path, "--json")
    assert imported == [], f"inspect imported {imported}"
    return report


def test_orbax_inspect_does_not_import_torch():
    assert_inspected_without_torch(FIXTURES / "orbax" / "fp32" / "ckpt")


def test_deepspeed_universal_inspect_does_not_import_torch():
    assert_inspected_without_torch(FIXTURES / "deepspeed-universal" / "zero2-fp32-z")


def test_keras_inspect_does_not_import_torch(tmp_path):
    """Keras' iteration counter and learning rate are read with numpy too."""
    import test_keras

    test_keras.train(tmp_path)
    report = assert_inspected_without_torch(tmp_path / "model.keras")
    assert report["groups"][0]["step"] is not None


def test_dcp_tied_copies_are_compared_without_torch(tmp_path):
    """DCP saves a tied weight twice: telling the untracked copy from a different tensor compares bytes."""
    from test_speed import dcp_checkpoint

    dcp_checkpoint(tmp_path / "dcp", trainers.TiedLM())
    report = assert_inspected_without_torch(tmp_path / "dcp")
    assert report["mapping"]["tied_copies"] == {"head.weight": "embed.weight"}


@pytest.mark.slow
def test_trainer_inspect_leaves_the_look_alikes_to_converts_order(trainer_checkpoint):
    """The Llama's norm gains look alike: content places the rest; the evidence counts are convert's."""
    report = assert_inspected_without_torch(trainer_checkpoint)
    converted, imported = cli_imports("convert", trainer_checkpoint, trainer_checkpoint.parent / "release", "--json")
    assert "transformers" in imported
    mapping, used = report["mapping"], converted["mapping"]
    assert 0 < mapping["evidence"]["order"] < mapping["entries_with_z"]
    assert mapping["evidence"] == used["evidence"] and mapping["confirmed_by_content"] == used["confirmed_by_content"]
    assert "the model's order, which convert rebuilds" in mapping["method"]
    assert "--param-order FILE gives it without" in mapping["method"]
    assert not any("x cannot be made" in w for w in report["warnings"])


@pytest.mark.slow
def test_peft_adapter_inspect_does_not_import_torch(lora_checkpoint):
    report = assert_inspected_without_torch(lora_checkpoint)
    assert report["container"] == "peft-adapter"


@pytest.mark.slow
def test_convert_with_param_order_does_not_rebuild_the_order(lora_checkpoint, tmp_path):
    """--param-order gives the order: the model is not rebuilt, transformers and peft are not imported."""
    order = lora_checkpoint.parent.parent / "order.txt"
    _, imported = cli_imports("convert", lora_checkpoint, tmp_path / "release", "--param-order", order, "--quiet")
    assert imported == ["torch"]


@pytest.mark.slow
def test_api_plan_with_the_order_deferred_is_never_written(trainer_checkpoint, tmp_path):
    """reconstruct(undecided_ok=True) leaves the order unbuilt; saving such a plan says what to do."""
    import sfckpt
    from sfckpt.mapping import OrderDeferred

    recon = sfckpt.reconstruct(sfckpt.load(trainer_checkpoint), undecided_ok=True)
    assert isinstance(recon.undecided, OrderDeferred)
    with pytest.raises(OrderDeferred, match="not rebuilt for a plan made with undecided_ok"):
        sfckpt.save(recon, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Accelerate's and the Trainer's FSDP folders (scripts/fsdp_runs.py: two CPU processes over gloo)."""
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("fsdp")
    result = subprocess.run([sys.executable, SCRIPTS / "fsdp_runs.py", root], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", ["accelerate-fsdp2-sharded-2pairs", "accelerate-fsdp1-sharded",
                                  "accelerate-fsdp2-full-bf16", "trainer-fsdp2-sharded/checkpoint-3",
                                  "trainer-fsdp2-full/checkpoint-3", "trainer-fsdp2-lora-sharded/checkpoint-3"])
def test_fsdp_folders_inspect_does_not_import_torch(case, fsdp_runs):
    assert_inspected_without_torch(fsdp_runs / case)


@pytest.mark.slow
def test_lightning_fsdp_inspect_does_not_import_torch(tmp_path):
    """Lightning's sharded FSDP `NAME.ckpt/` folder (scripts/lightning_fsdp.py: two CPU processes over gloo)."""
    pytest.importorskip("lightning")
    from conftest import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, SCRIPTS / "lightning_fsdp.py", tmp_path / "one", "one"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert assert_inspected_without_torch(tmp_path / "one" / "last.ckpt")["container"] == "lightning-fsdp"
