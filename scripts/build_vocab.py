"""Builds the shipped SentencePiece protein vocabulary (one piece per residue).

Run: python scripts/build_vocab.py  -> ankh3_jax/assets/ankh3_protein.model

Ids: 0 <pad>, 1 </s>, 2 <unk>, then [NLU], [S2S], then the 25 residue letters. seqio adds
the `<extra_id_N>` sentinels on top (see ankh3_jax.vocab). A normalisation rule maps lower
case residue letters to upper case, so 'mkv' and 'MKV' encode alike.
"""
import io
import os
import tempfile

import sentencepiece as spm

from ankh3_jax.vocab import CONTROL_TOKENS, RESIDUES, VOCAB_PATH


def build(path: str = VOCAB_PATH) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, "rules.tsv")
    with open(rules, "w") as f:
      # Lower -> upper case for every residue letter (hex code points).
      for letter in RESIDUES:
        f.write(f"{ord(letter.lower()):X}\t{ord(letter):X}\n")
    corpus = io.StringIO("\n".join(RESIDUES * 4 for _ in range(8)))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.getvalue().splitlines()),
        model_writer=model,
        model_type="char",
        vocab_size=3 + len(CONTROL_TOKENS) + len(RESIDUES),
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        user_defined_symbols=list(CONTROL_TOKENS),
        normalization_rule_tsv=rules,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        character_coverage=1.0,
        minloglevel=2,
    )
  tmp_path = path + ".tmp"
  with open(tmp_path, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp_path, path)


if __name__ == "__main__":
  build()
  print(f"wrote {VOCAB_PATH}")
