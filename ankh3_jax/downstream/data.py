"""The shipped structure-derived set: secondary structure and CB contact maps.

`assets/downstream/structures.npz` holds 1,300 PDB chains (1000 train / 150 validation /
150 test, no near-identical sequences within or across splits) derived from ProMod3's
structure database by `scripts/make_downstream_data.py`; see `assets/downstream/SOURCE.md`.
"""
import dataclasses
import functools
import os
from typing import Optional

import numpy as np

from ankh3_jax.vocab import ASSETS_DIR

STRUCTURES_PATH = os.path.join(ASSETS_DIR, "downstream", "structures.npz")
SPLITS = ("train", "validation", "test")
# 8-state DSSP classes (coil written 'C') and the usual reduction to 3 states.
SS8_CLASSES = "HGIEBTSC"
SS3_CLASSES = "HEC"
SS8_TO_SS3 = {"H": "H", "G": "H", "I": "H", "E": "E", "B": "E", "T": "C", "S": "C",
              "C": "C", "L": "C", "-": "C", " ": "C"}
CONTACT_ANGSTROM = 8.0
BURIAL_ANGSTROM = 10.0
LONG_RANGE = 24
IGNORE = -1  # label of residues that are not scored


@dataclasses.dataclass(frozen=True)
class Chain:
  """One chain: sequence, 8-state DSSP and CB coordinates [L, 3] in Angstrom."""
  id: str
  sequence: str
  dssp8: str
  cb: np.ndarray

  @property
  def ss3(self) -> str:
    return ss8_to_ss3(self.dssp8)


def ss8_to_ss3(dssp8: str) -> str:
  """H/G/I -> H, E/B -> E, anything else -> C."""
  return "".join(SS8_TO_SS3.get(c, "C") for c in dssp8)


def encode_labels(states: str, classes: str) -> np.ndarray:
  """State letters -> int labels (index in `classes`); unknown letters -> IGNORE."""
  lookup = {c: i for i, c in enumerate(classes)}
  return np.array([lookup.get(c, IGNORE) for c in states], np.int32)


def contact_map(cb: np.ndarray, threshold: float = CONTACT_ANGSTROM) -> np.ndarray:
  """[L, L] bool: CB-CB distance below `threshold` Angstrom."""
  diff = cb[:, None, :] - cb[None, :, :]
  return np.sqrt(np.sum(diff * diff, axis=-1)) < threshold


def burial_counts(cb: np.ndarray, radius: float = BURIAL_ANGSTROM) -> np.ndarray:
  """[L] int32: CB atoms of the chain within `radius` Angstrom of each residue's CB (a
  burial / solvent-exposure measure that needs no side-chain atoms)."""
  diff = cb[:, None, :] - cb[None, :, :]
  close = np.sum(diff * diff, axis=-1) < radius * radius
  return (np.sum(close, axis=1) - 1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"downstream data not found: {path} (derive it with "
                            "scripts/make_downstream_data.py)")
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def load_chains(split: Optional[str] = None, path: str = STRUCTURES_PATH,
                limit: Optional[int] = None) -> list:
  """The `Chain`s of one split ('train', 'validation', 'test') or of all (None)."""
  if split is not None and split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
  z = _load(os.fspath(path))
  chains = []
  for i, code in enumerate(z["split"]):
    if split is not None and SPLITS[code] != split:
      continue
    lo, hi = z["offsets"][i], z["offsets"][i + 1]
    chains.append(Chain(z["ids"][i].decode(), z["sequence"][i].decode(),
                        z["dssp8"][i].decode(), z["cb"][lo:hi].astype(np.float32) / 100.0))
    if limit is not None and len(chains) >= limit:
      break
  return chains
