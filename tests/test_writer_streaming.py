"""Big-checkpoint behaviour, checked on small ones: only the needed bytes are read, shards
round-trip, start-up stays light."""
import subprocess
import sys

from safetensors.torch import load_file

import sfckpt
import trainers
from conftest import assert_equal_tensors, read
from sfckpt.readers.torch_file import TorchArchive


def test_convert_reads_only_y_and_z(trained, run, tmp_path, monkeypatch):
    ckpt, x, _ = trained("adamw", model=trainers.ConvBN())
    ck = sfckpt.load(ckpt)
    exp_avg_sq_keys = {e["exp_avg_sq"].storage_id[1] for e in ck.optimizer["state"].values()}
    z_keys = {e["z"].storage_id[1] for e in ck.optimizer["state"].values()}
    assert exp_avg_sq_keys  # the checkpoint really has second moments
    read_keys = []
    original = TorchArchive.read_elements

    def spy(self, key, *args):
        read_keys.append(key)
        return original(self, key, *args)

    monkeypatch.setattr(TorchArchive, "read_elements", spy)
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    assert read_keys, "nothing was read"
    assert not exp_avg_sq_keys & set(read_keys), "convert read exp_avg_sq"
    assert z_keys <= set(read_keys)
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)


def test_sharded_round_trip_equals_single_file(trained, run, tmp_path):
    ckpt, _, _ = trained("sgd", model=trainers.TiedLM())
    assert run("convert", ckpt, tmp_path / "one.safetensors").exit_code == 0
    assert run("convert", ckpt, tmp_path / "sharded", "--max-shard-size", "0.3KB").exit_code == 0
    merged = {}
    for shard in sorted((tmp_path / "sharded").glob("model-*.safetensors")):
        merged.update(load_file(str(shard)))
    assert_equal_tensors(merged, read(tmp_path / "one.safetensors"))
    result = run("convert", ckpt, tmp_path / "bad.safetensors", "--max-shard-size", "1GB")
    assert result.exit_code == 2 and "needs a folder" in result.stderr
    result = run("convert", ckpt, tmp_path / "bad2", "--max-shard-size", "lots")
    assert result.exit_code == 2 and "is not a size" in result.stderr


def test_inspect_and_help_do_not_import_torch(trained):
    ckpt, _, _ = trained("adamw")
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom sfckpt.cli import main\n"
        f"r = CliRunner().invoke(main, ['inspect', {str(ckpt)!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(main, ['convert', '--bad-option'])\nassert r.exit_code == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_progress_reports_every_byte(trained, tmp_path):
    ckpt, _, _ = trained("adamw")
    recon = sfckpt.reconstruct(sfckpt.load(ckpt))
    done = []
    sfckpt.save(recon, tmp_path / "x.safetensors", progress=done.append)
    assert sum(done) == sum(t.nbytes for t in recon.tensors)
