"""What a MODEL_DIR was trained with, checked on every resume (MODEL_DIR/run_settings.json).

A checkpoint holds arrays, not their meaning: a model config with the same shapes but
another activation, another masking probability or another optimizer would restore
and train on, and the export would pair the weights with a config they were not
trained under. Process 0 therefore writes, when a run starts, the model config, the
data source's `describe()`, the training arguments and every gin binding that shapes
the trajectory (macros resolved; not MODEL_DIR, intervals, mesh or checkpoint
settings). A resumed run compares its own; a difference is refused with the list,
unless each differing setting is allowed (`allow_changed`: a full key such as
`training.train_steps`, its last part such as `peak_learning_rate`, or a group such
as `gin`). A directory from before the record resumes with a warning and gets one.

The record also carries a run id; the trainer's export writes it into
MODEL_DIR/model, so that a later run replaces only an export of its own run.
"""
import json
import logging
import os
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

import gin

from ankh3_jax import config as config_lib

RECORD_FILE = "run_settings.json"
EXPORT_MARKER = "ankh3_train_export.json"
FORMAT = 1
# Bindings that do not change what is learnt (or are recorded elsewhere).
_UNRECORDED_SELECTORS = ("ankh3_jax.training.trainer.train",
                         "ankh3_jax.training.checkpoints.Checkpointer",
                         "ankh3_jax.partitioning.create_mesh",
                         "ankh3_jax.partitioning.standard_logical_axis_rules",
                         "ankh3_jax.config.preset", "gin.macro")
_UNRECORDED_PARAMS = {"ankh3_jax.training.seqio_data.SeqioSource": ("max_eval_batches",
                                                                    "eval_task_names")}


class RunSettingsError(ValueError):
  """MODEL_DIR belongs to a run with other settings, or its export slot is taken."""


def current_settings(model_config: config_lib.T5Config, data_source: Any,
                     training: Mapping[str, Any]) -> dict:
  """{model, data, training, gin} of this run, JSON-ready."""
  describe = getattr(data_source, "describe", None)
  return _jsonable({"model": config_lib.config_to_dict(model_config),
                    "data": describe() if describe else {"source": repr(data_source)},
                    "training": dict(training), "gin": gin_bindings()})


def gin_bindings() -> dict:
  """{selector.param: value} of the parsed gin bindings that shape training."""
  out = {}
  for (scope, selector), params in sorted(gin.config._CONFIG.items()):  # pylint: disable=protected-access
    if selector in _UNRECORDED_SELECTORS:
      continue
    name = f"{scope}/{selector}" if scope else selector
    for param, value in sorted(params.items()):
      if param in _UNRECORDED_PARAMS.get(selector, ()):
        continue
      out[f"{name}.{param}"] = _resolve(value)
  return out


def _resolve(value: Any) -> Any:
  """A gin value with macros replaced by their values and references by their names."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.evaluate and value.configurable.wrapped is gin.config.macro:
      return _resolve(gin.query_parameter("%" + "/".join(value.scopes)))
    return repr(value)
  if isinstance(value, (list, tuple)):
    return [_resolve(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _resolve(v) for k, v in value.items()}
  return value


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, sort_keys=True, default=repr))


def flatten(settings: Mapping[str, Any]) -> dict:
  """{'model.feed_forward_proj': ..., 'gin.<selector>.<param>': ...}."""
  return {f"{group}.{key}": value for group, values in settings.items()
          for key, value in values.items()}


def is_allowed(key: str, allow_changed: Sequence[str]) -> bool:
  group = key.split(".")[0]
  return any(key == name or key.endswith("." + name) or group == name
             for name in allow_changed)


def allow_name(key: str, keys: Sequence[str]) -> str:
  """The shortest dotted suffix of `key` that `is_allowed` matches to no other of `keys`
  (e.g. 'train_steps', but 'make_schedule.name' rather than 'name')."""
  parts = key.split(".")
  for start in range(len(parts) - 1, 0, -1):
    name = ".".join(parts[start:])
    if not any(is_allowed(other, [name]) for other in keys if other != key):
      return name
  return key


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict:
  """{key: (saved value, current value)} of the flattened settings that differ."""
  saved, current = flatten(saved), flatten(current)
  missing = object()
  diff = {}
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      diff[key] = (None if old is missing else old, None if new is missing else new)
  return diff


def _format(diff: Mapping[str, tuple]) -> str:
  return "\n  ".join(f"{key}: {old!r} (saved) -> {new!r} (now)"
                     for key, (old, new) in diff.items())


def read_record(model_dir: str) -> Optional[dict]:
  path = os.path.join(model_dir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record.get("settings"), dict) or not record.get("run_id"):
      raise ValueError("no 'settings' or 'run_id'")
  except (ValueError, AttributeError) as e:
    raise RunSettingsError(f"{path}: unreadable run record ({e}); it says what the "
                           "checkpoints were trained with: restore it, or use a new "
                           "MODEL_DIR") from None
  return record


def write_record(model_dir: str, record: dict) -> None:
  path = os.path.join(model_dir, RECORD_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_and_record(model_dir: str, settings: dict, resuming: bool,
                     allow_changed: Sequence[str] = (), write: bool = True) -> dict:
  """Compares `settings` with MODEL_DIR's record when `resuming`; writes the record.

  Returns the record in effect. Raises RunSettingsError listing the settings that
  differ from the saved ones and are not in `allow_changed`.
  """
  now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
  record = read_record(model_dir)
  if record is None:
    if resuming:
      logging.warning("%s has checkpoints but no %s (a run from before the record): "
                      "resuming unchecked; the current settings are recorded now",
                      model_dir, RECORD_FILE)
    record = {"format": FORMAT, "run_id": uuid.uuid4().hex, "created": now, "changes": []}
  elif resuming:
    diff = differences(record["settings"], settings)
    keys = {*flatten(record["settings"]), *flatten(settings)}
    refused = {k: v for k, v in diff.items() if not is_allowed(k, allow_changed)}
    if refused:
      raise RunSettingsError(
          f"{model_dir} was trained with other settings (from {RECORD_FILE}); resuming "
          f"with these changes would mix two runs:\n  {_format(refused)}\nUse the saved "
          "settings, a new MODEL_DIR, or allow the harmless ones explicitly with "
          f"--allow_changed={','.join(allow_name(k, keys) for k in refused)}")
    if diff:
      logging.warning("resuming %s with changed settings (allowed):\n  %s", model_dir,
                      _format(diff))
      record.setdefault("changes", []).append(
          {"time": now, "changed": {k: list(v) for k, v in diff.items()}})
  record["settings"] = settings
  if write:
    write_record(model_dir, record)
  return record


def check_export_target(path: str, run_id: str) -> None:
  """Raises RunSettingsError if `path` exists and is not an export of run `run_id`."""
  if not os.path.lexists(path):
    return
  marker = os.path.join(path, EXPORT_MARKER)
  owner = None
  if os.path.isdir(path) and os.path.isfile(marker):
    try:
      with open(marker, encoding="utf-8") as f:
        owner = json.load(f).get("run_id")
    except (ValueError, AttributeError, OSError):
      owner = None
  if owner != run_id:
    reason = ("an export of another run" if owner else
              "not an export of this run (no " + EXPORT_MARKER + ")")
    raise RunSettingsError(
        f"{path} exists and is {reason}: the final export would replace it. Move it "
        "away, or set ankh3_jax.training.trainer.train.export=False")


def write_export_marker(path: str, run_id: str, step: int) -> None:
  with open(os.path.join(path, EXPORT_MARKER), "w", encoding="utf-8") as f:
    json.dump({"run_id": run_id, "step": int(step)}, f)
