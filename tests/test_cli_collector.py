"""The garbage collector while `convert` reads a checkpoint: what is alive is hidden from it, and
given back once the plan is made, so an in-process caller's objects stay collectable."""
import gc


def test_convert_gives_frozen_objects_back_to_the_collector(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    before = gc.get_freeze_count()
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    assert gc.get_freeze_count() == before
