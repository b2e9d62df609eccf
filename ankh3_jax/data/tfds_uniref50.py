"""TFDS builder `ankh3_uniref50`: UniRef50 from a FASTA file the user downloads.

Splits train / validation / test by the SHA-256 of each cluster id
(`ankh3_jax.data.corpus.split_for_id`), so membership never depends on file order.
Each split generator streams the whole FASTA file once (three passes in all).

  from etils import epath
import tensorflow_datasets as tfds
  from ankh3_jax.data import tfds_uniref50
  builder = tfds_uniref50.Ankh3Uniref50(data_dir="/data/tfds")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/manual"))
"""
import dataclasses
import os
from typing import Optional, Tuple

from etils import epath
import tensorflow_datasets as tfds

from ankh3_jax.data import corpus
from ankh3_jax.data import fasta

FASTA_SUFFIXES = (".fasta.gz", ".fasta", ".fa.gz", ".fa")


@dataclasses.dataclass(eq=False)
class Uniref50Config(tfds.core.BuilderConfig):
  """Split fractions, an optional length limit and the FASTA file name to look for."""
  validation_fraction: float = 0.0005
  test_fraction: float = 0.0005
  max_length: Optional[int] = None
  file_names: Tuple[str, ...] = ("uniref50.fasta.gz", "uniref50.fasta")


class Ankh3Uniref50(tfds.core.GeneratorBasedBuilder):
  """UniRef50 protein sequences with deterministic id-hash splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: id and sequence, id-hash splits."}
  BUILDER_CONFIGS = [Uniref50Config(name="default")]
  # TFDS derives this from the package, which needs `importlib_resources` (not in the
  # pinned stack) for editable installs; the file itself is the honest answer.
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download UniRef50 (about 12 GB gzip) from UniProt, for example
    https://ftp.uniprot.org/pub/databases/uniprot/uniref/uniref50/uniref50.fasta.gz
  and place `uniref50.fasta.gz` (or `uniref50.fasta`) in the manual directory
  (`download_config.manual_dir`, default `<data_dir>/downloads/manual/`). If the
  directory holds exactly one other *.fasta[.gz] / *.fa[.gz] file, that file is used.
  UniProt data are licensed under CC BY 4.0.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="UniRef50 cluster representative sequences for Ankh3 pre-training.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "sequence": tfds.features.Text(),
        }),
        homepage="https://www.uniprot.org/help/uniref",
        citation="""@article{suzek2015uniref,
  title={UniRef clusters: a comprehensive and scalable alternative for improving
         sequence similarity searches},
  author={Suzek, Baris E and Wang, Yuqi and Huang, Hongzhan and McGarvey, Peter B
          and Wu, Cathy H and {UniProt Consortium}},
  journal={Bioinformatics}, volume={31}, number={6}, pages={926--932}, year={2015}}""",
    )

  def _find_fasta(self, manual_dir: str) -> str:
    manual_dir = os.fspath(manual_dir)
    for name in self.builder_config.file_names:
      path = os.path.join(manual_dir, name)
      if os.path.exists(path):
        return path
    candidates = sorted(n for n in os.listdir(manual_dir) if n.endswith(FASTA_SUFFIXES))
    if len(candidates) == 1:
      return os.path.join(manual_dir, candidates[0])
    raise FileNotFoundError(
        f"no unique UniRef50 FASTA file in {manual_dir} (found {candidates}); "
        f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    path = self._find_fasta(dl_manager.manual_dir)
    return {split: self._generate_examples(path, split) for split in corpus.SPLITS}

  def _generate_examples(self, path: str, split: str):
    config = self.builder_config
    for record in fasta.read_fasta(path, max_length=config.max_length):
      if corpus.split_for_id(record.id, config.validation_fraction,
                             config.test_fraction) == split:
        yield record.id, {"id": record.id, "sequence": record.sequence}
