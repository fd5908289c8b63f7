"""sfckpt inside training runs: x written as the run goes, without touching the optimizer's mode.

One module per framework, each imported only when used (nothing here is needed by the CLI):

- `live.release(model, optimizer, path)` (also `sfckpt.release`): x of live objects, for plain
  loops, DDP and Accelerate without sharding.
- `transformers.SfckptCallback`: the Hugging Face Trainer; converts each `checkpoint-N/` it saves.
- `lightning.SfckptReleases` and `lightning.ValidateOnX`: Lightning's checkpoints and validation.
- `accelerate.save_and_release(accelerator, folder, out)`: `save_state` then `convert`.

Why never toggle: `optimizer.eval()` then `train()` does not give back the same bits, and a
framework captures the mode flag when it saves, so a switch around a save pairs weights with a
flag that describes the other set (see docs/integrations.md).
"""
