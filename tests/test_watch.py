"""`sfckpt watch`: a second process writes checkpoints slowly; each is released exactly once, equal to
the x the optimizer's own eval() gave at that step, and never read half-written."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import trainers
from conftest import assert_equal_tensors, read, save_checkpoint

HERE = Path(__file__).resolve().parent

# torch.save made slow: the file appears at once and grows a chunk at a time, as on a slow disk.
SLOW_SAVE = textwrap.dedent(
    """
    import io, time, torch
    _save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, bytes)) and not hasattr(f, "__fspath__"):
            return _save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as out:
            for start in range(0, len(data), len(data) // 4 + 1):
                out.write(data[start:start + len(data) // 4 + 1])
                out.flush()
                time.sleep(0.4)

    torch.save = slow_save
    """
)

PLAIN_RUN = SLOW_SAVE + textwrap.dedent(
    """
    import copy, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    import trainers

    run, expected = Path(sys.argv[1]), Path(sys.argv[2])
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", steps=1)
    for step in (2, 4, 6):
        for _ in range(2):
            opt.zero_grad()
            model(trainers.example_input(model)).pow(2).mean().backward()
            opt.step()
        twin, twin_opt = copy.deepcopy((model, opt))
        twin_opt.eval()
        _save({k: v.detach().clone() for k, v in twin.state_dict().items()}, expected / f"step_{step}.pt")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, run / f"step_{step}.pt")
    """
)

TRAINER_RUN = SLOW_SAVE + textwrap.dedent(
    """
    import copy, sys
    from pathlib import Path
    import transformers

    run, expected = Path(sys.argv[1]), Path(sys.argv[2])

    class CaptureX(transformers.TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            twin, twin_opt = copy.deepcopy((model, optimizer.optimizer))
            twin_opt.eval()
            _save({k: v.detach().clone() for k, v in twin.state_dict().items()}, expected / f"checkpoint-{state.global_step}.pt")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    data = [{"input_ids": torch.randint(0, 48, (8,)), "labels": torch.randint(0, 48, (8,))} for _ in range(16)]
    args = transformers.TrainingArguments(output_dir=str(run), optim="schedule_free_adamw", learning_rate=1e-2,
                                          per_device_train_batch_size=4, max_steps=6, save_steps=2, report_to=[],
                                          use_cpu=True, logging_steps=100, lr_scheduler_type="constant")
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[CaptureX()]).train()
    """
)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _watch(run_dir, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "sfckpt", "watch", str(run_dir), "--out", str(out), "--interval", "0.2",
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _run_and_watch(tmp_path, script, releases):
    """Run the writer beside a watch; once the releases are there (on a loaded machine the watch may lag),
    a few more polls to see that nothing is converted twice, then Ctrl-C."""
    run, expected, out = tmp_path / "run", tmp_path / "expected", tmp_path / "releases"
    run.mkdir()
    expected.mkdir()
    watcher = _watch(run, out)
    writer = subprocess.run([sys.executable, "-c", script, str(run), str(expected), str(HERE)], capture_output=True,
                            text=True, env=_env())
    assert writer.returncode == 0, writer.stderr[-3000:]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and watcher.poll() is None and \
            not all((out / name / "model.safetensors").is_file() for name in releases):
        time.sleep(0.2)
    time.sleep(2)
    watcher.send_signal(signal.SIGINT)
    stdout, stderr = watcher.communicate(timeout=60)
    assert watcher.returncode == 130, stderr
    assert "warning" not in stderr, stderr
    return expected, out, stderr


@pytest.mark.slow
def test_watch_releases_each_slowly_written_torch_save_once(tmp_path):
    expected, out, stderr = _run_and_watch(tmp_path, PLAIN_RUN, ["step_2", "step_4", "step_6"])
    assert sorted(p.name for p in out.iterdir()) == ["step_2", "step_4", "step_6"]
    for step in (2, 4, 6):
        assert stderr.count(f"(from step_{step}.pt)") == 1, stderr
        assert_equal_tensors(read(out / f"step_{step}" / "model.safetensors"), torch.load(expected / f"step_{step}.pt"))


@pytest.mark.slow
def test_watch_releases_each_checkpoint_of_a_live_trainer_run_once(tmp_path):
    pytest.importorskip("transformers")
    expected, out, stderr = _run_and_watch(tmp_path, TRAINER_RUN, ["checkpoint-2", "checkpoint-4", "checkpoint-6"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        assert stderr.count(f"(from checkpoint-{step})") == 1, stderr
        x = torch.load(expected / f"checkpoint-{step}.pt")
        del x["lm_head.weight"]  # tied: the Trainer's model.safetensors keeps one name
        release = out / f"checkpoint-{step}" / "model.safetensors"
        assert_equal_tensors(read(release), x)
        with safe_open(str(release), "pt") as f:
            assert f.metadata()["sfckpt_checkpoint"] == f"checkpoint-{step}"
            assert f.metadata()["sfckpt_training_step"] == str(step)


def _finished_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    xs = {}
    for step in (1, 2):
        model = trainers.MLP()
        opt = trainers.train(model, "adamw", steps=step + 1, seed=step)
        save_checkpoint(run / f"step_{step}.pt", model, opt)
        xs[step] = trainers.eval_x(model, opt)
    return run, xs


def test_watch_once_converts_what_is_there_and_a_restart_writes_nothing(tmp_path, run):
    run_dir, xs = _finished_run(tmp_path)
    result = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    for step, x in xs.items():
        assert_equal_tensors(read(tmp_path / "out" / f"step_{step}" / "model.safetensors"), x)
    again = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert again.exit_code == 0 and "wrote" not in again.stderr


def test_watch_converts_a_checkpoint_written_again_in_place(tmp_path, run):
    """Lightning overwrites last.ckpt at every save: the release follows it."""
    run_dir, _ = _finished_run(tmp_path)
    assert run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05").exit_code == 0
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", steps=5, seed=7)
    time.sleep(0.05)
    save_checkpoint(run_dir / "step_2.pt", model, opt)
    result = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0 and result.stderr.count("wrote") == 1, result.stderr
    assert_equal_tensors(read(tmp_path / "out" / "step_2" / "model.safetensors"), trainers.eval_x(model, opt))


def test_watch_skips_a_half_written_file(tmp_path, run):
    run_dir, _ = _finished_run(tmp_path)
    data = (run_dir / "step_2.pt").read_bytes()
    (run_dir / "step_2.pt").write_bytes(data[: len(data) // 2])
    result = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1"]


def test_watch_reports_a_checkpoint_it_cannot_convert_and_exits_2_with_once(tmp_path, run):
    run_dir, _ = _finished_run(tmp_path)
    model = trainers.MLP()
    torch.save({"model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1).state_dict()},
               run_dir / "plain_sgd.pt")
    result = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 2
    assert "warning: plain_sgd.pt: no release:" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 checkpoint in")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step_1", "step_2"]


def test_watch_refuses_a_checkpoint_as_the_run_folder(tmp_path, run):
    run_dir, _ = _finished_run(tmp_path)
    checkpoint = run_dir / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    result = run("watch", checkpoint, "--out", tmp_path / "out", "--once")
    assert result.exit_code == 2 and "is itself a checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()


def test_watch_a_deepspeed_save_folder_converts_its_tags(tmp_path, run):
    """`engine.save_checkpoint(dir)` writes dir/latest and dir/global_stepN/: the folder is the run, its tags the saves."""
    import shutil

    from test_readers_deepspeed import DS, expected_output

    shutil.copytree(DS / "zero2-fp32", tmp_path / "ds", ignore=shutil.ignore_patterns("expected.pt"))
    result = run("watch", tmp_path / "ds", "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "out" / "global_step3" / "model.safetensors"),
                         expected_output(DS / "zero2-fp32", None))


def test_watch_waits_for_a_deepspeed_tag_that_latest_does_not_name_yet(tmp_path, run):
    """A tag written after `latest` was (a save in progress, whose `latest` comes last) is not read."""
    import shutil

    from test_readers_deepspeed import DS

    shutil.copytree(DS / "zero2-fp32", tmp_path / "ds", ignore=shutil.ignore_patterns("expected.pt"))
    (tmp_path / "ds" / "latest").write_text("global_step1")
    time.sleep(0.02)
    for f in (tmp_path / "ds" / "global_step3").iterdir():
        os.utime(f)  # written after latest
    result = run("watch", tmp_path / "ds", "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "out" / "global_step3").exists()


def test_watch_converts_a_keras_file(tmp_path, run):
    """Keras' reader says when a `.keras` save is whole."""
    pytest.importorskip("keras")
    import shutil

    import test_keras

    test_keras.train(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tmp_path / "model.keras", run_dir / "model.keras")
    result = run("watch", run_dir, "--out", tmp_path / "out", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]
    test_keras.assert_x(tmp_path / "out" / "model" / "model.safetensors", tmp_path / "expected.weights.h5")
