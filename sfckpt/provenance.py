"""Where a release came from, and checkpoints whose mode flag may not describe their weights.

Releases written by the integrations and `sfckpt watch` say in their safetensors metadata which
checkpoint and training step they came from: the checkpoint's name, never a path (releases get
uploaded, and a path tells where and by whom they were made).

Schedule-Free callbacks written for Lightning and the Trainer switch the optimizer's mode around a
save, and get the order wrong in known ways: one calls `eval()` inside `on_save_checkpoint`, after
Lightning captured `train_mode`, so the file pairs x with a flag that says y; another captures the
state after `eval()` and then calls `train()`, pairing y with a flag that says x. sfckpt trusts the
flag, so `inspect` warns when a checkpoint shows such a callback's traces.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

# The top-level entry a community callback adds beside Lightning's own optimizer_states
COMMUNITY_KEY = "schedulefree_optimizer_state_dict"
_SCHEDULE_FREE = re.compile(r"schedule[-_ ]?free|\bsf[-_]?callback", re.IGNORECASE)
ADVICE = ("check which weights it holds (sfckpt diff, or sfckpt check against a trusted release) and pass "
          "--params-are y or --params-are x to say so")


def release_metadata(checkpoint_name: str, step: Any) -> dict[str, str]:
    """Metadata naming the checkpoint (its file or folder name only) and the training step of a release."""
    return {"sfckpt_checkpoint": Path(checkpoint_name).name, "sfckpt_training_step": json.dumps(step)}


def callback_names(obj: Any) -> list[str]:
    """The entries of a Lightning checkpoint's `callbacks` (each callback's state key)."""
    callbacks = obj.get("callbacks") if isinstance(obj, Mapping) else None
    return [str(k)[:200] for k in callbacks] if isinstance(callbacks, Mapping) else []


def warnings_for(top_level_keys: list[str], callbacks: list[str], train_modes: Mapping[str, list[Any]]) -> list[str]:
    """Why the saved train_mode may not describe the saved weights, if anything says so (`train_modes`:
    each optimizer's groups' flags)."""
    found = []
    if COMMUNITY_KEY in top_level_keys:
        found.append(f"the checkpoint has a top-level '{COMMUNITY_KEY}', which a community Schedule-Free callback "
                     "saves; such callbacks switch the optimizer's mode around the save, so its train_mode may "
                     f"not describe the saved weights: {ADVICE}")
    named = [c for c in callbacks if _SCHEDULE_FREE.search(c)]
    if named:
        found.append(f"the checkpoint was saved with the callback {', '.join(named[:3])}, which may switch the "
                     f"optimizer's mode around the save, so its train_mode may not describe the saved weights: {ADVICE}")
    if any(len({m for m in modes if isinstance(m, bool)}) > 1 for modes in train_modes.values()):
        found.append("the optimizer's parameter groups disagree on train_mode (eval() and train() switch every "
                     f"group together, so a flag was changed by hand or captured mid-switch): {ADVICE}")
    return found
